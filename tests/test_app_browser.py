"""The app in a real browser (Playwright driving Debian's /usr/bin/chromium, headless).

Open the page, see the error for a search without a query, upload a picture, crop the
object with the editor's crop tool, search, see the results grid, open a result and
see its heatmaps; then one click on an example. Screenshots go to ``test-artifacts/``.
"""
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_server import ROOT, AppServer

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

ARTIFACTS = ROOT / "test-artifacts"
SCENE = ROOT / "assets" / "demo" / "queries" / "scenes" / "cat_face_1.jpg"
CAT_BOX = (109, 88, 259, 232)          # the cat's face in SCENE, from assets/demo/annotations.json
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("browser_data")
    app = AppServer(data / "galleries", data / "app.log").start()
    app.wait_for_demo()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def page(server):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url)
        page.locator("#query-editor").wait_for()
        page.wait_for_timeout(1000)            # the editor's canvas initialises after it appears
        yield page
        browser.close()


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    best, start = (0, 0), None
    for i, on in enumerate(list(mask) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def _picture_rect(screenshot: bytes) -> tuple[int, int, int, int]:
    """Where the picture sits in a screenshot of the editor in crop mode: the rows and
    columns that differ from the grey backdrop across the middle of the view."""
    a = np.asarray(Image.open(io.BytesIO(screenshot)).convert("RGB")).astype(int)
    h, w, _ = a.shape
    backdrop = a[h // 2, 3]
    differs = np.abs(a - backdrop).max(-1) > 12
    (x0, x1) = _longest_run(differs[int(h * 0.35):int(h * 0.65)].mean(0) > 0.9)
    (y0, y1) = _longest_run(differs[:, int(w * 0.35):int(w * 0.65)].mean(1) > 0.9)
    return x0, y0, x1, y1


def _drag(page, start, end):
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def test_search_without_a_query_says_so(page):
    page.locator("#search-btn").click()
    toast = page.get_by_text("Upload, paste or drop a query image first")
    toast.first.wait_for()
    assert "Traceback" not in page.content()


def test_upload_crop_search_and_open_a_result(page):
    editor = page.locator("#query-editor")
    with page.expect_file_chooser() as chooser:
        editor.locator("button[title=Upload]").click()
    chooser.value.set_files(str(SCENE))
    page.wait_for_timeout(1500)
    if not editor.locator("button[title=Crop]").is_visible():
        editor.locator("button[title=Image]").click()
    editor.locator("button[title=Crop]").click()
    page.wait_for_timeout(800)
    shot = editor.screenshot(path=str(ARTIFACTS / "crop_mode.png"))
    x0, y0, x1, y1 = _picture_rect(shot)
    width, height = Image.open(SCENE).size
    scale = (x1 - x0) / width
    assert abs((y1 - y0) / height - scale) < 0.02, "the picture's frame was not found"
    box = editor.bounding_box()
    left, top = box["x"] + x0, box["y"] + y0

    def on_screen(px, py):
        return left + px * scale, top + py * scale

    _drag(page, (left, top), on_screen(*CAT_BOX[:2]))                     # top-left handle
    _drag(page, (left + (x1 - x0), top + (y1 - y0)), on_screen(*CAT_BOX[2:]))  # bottom-right handle
    editor.locator("button[title='Confirm crop']").click()
    # the editor hands the cropped picture to the app asynchronously: wait, as a user would, until
    # "Query as searched" shows the crop (searching earlier can send the uncropped picture)
    page.wait_for_function(
        "() => { const img = document.querySelector('#query-shown img');"
        " return img && img.complete && Math.abs(img.naturalWidth - 150) <= 12"
        " && Math.abs(img.naturalHeight - 144) <= 12; }", timeout=TIMEOUT_MS)

    page.locator("#search-btn").click()
    status = page.locator("#search-status")
    page.wait_for_function("() => document.querySelector('#search-status').innerText.includes('results from')",
                           timeout=TIMEOUT_MS)
    w, h = map(int, re.search(r"query (\d+)×(\d+) px", status.inner_text()).groups())
    assert abs(w - 150) <= 12 and abs(h - 144) <= 12, status.inner_text()   # the crop, not the picture
    tiles = page.locator("#results-grid img")
    tiles.nth(11).wait_for()
    assert tiles.count() == 12
    page.locator("#results-grid").screenshot(path=str(ARTIFACTS / "results_grid.png"))

    tiles.nth(1).click()
    page.wait_for_function("() => document.querySelector('#detail-text').innerText.startsWith('#2')",
                           timeout=TIMEOUT_MS)
    text = page.locator("#detail-text").inner_text()
    assert "coarse score" in text and "fine score" in text and "best query scale" in text
    for elem in ("#detail-overlay img", "#detail-levels img", "#score-plot img"):
        page.locator(elem).wait_for()
    page.wait_for_timeout(500)
    top_y = _page_box(page, "#detail-overlay")["y"]
    bottom = _page_box(page, "#detail-levels")
    page.screenshot(path=str(ARTIFACTS / "heatmap_detail.png"), full_page=True,
                    clip={"x": 0, "y": top_y - 8, "width": 1400, "height": bottom["y"] + bottom["height"] - top_y + 16})
    page.screenshot(path=str(ARTIFACTS / "app_full.png"), full_page=True)
    _small_screenshot(page)


def _page_box(page, selector: str) -> dict:
    """An element's box in page coordinates (``bounding_box`` is relative to the scrolled viewport)."""
    box = page.locator(selector).bounding_box()
    return {**box, "y": box["y"] + page.evaluate("window.scrollY")}


def _small_screenshot(page):
    """A compact picture of the whole app for the README (copied to docs/screenshot.png)."""
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    end = _page_box(page, "#detail-levels")
    shot = shot.crop((0, 0, shot.width, min(shot.height, int(end["y"] + end["height"] + 10))))
    shot = shot.resize((1000, round(shot.height * 1000 / shot.width)), Image.LANCZOS)
    shot.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(ARTIFACTS / "screenshot.png", optimize=True)


def test_one_click_example(page):
    page.get_by_role("button", name="coffee cup").click()
    page.wait_for_function(
        "() => document.querySelector('#search-status').innerText.includes('query 124×150 px')"
        " && document.querySelector('#detail-text').innerText.startsWith('#1')", timeout=TIMEOUT_MS)
    assert page.locator("#results-grid img").count() == 12


def test_upload_a_folder_as_a_new_gallery(page, tmp_path):
    folder = tmp_path / "holiday"
    folder.mkdir()
    for name in ("0001.jpg", "0002.jpg"):
        (folder / name).write_bytes((ROOT / "assets" / "demo" / "gallery" / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    page.get_by_text("Your galleries: upload a folder, files or a zip").click()
    page.locator("#gallery-name textarea, #gallery-name input").first.fill("Browser Trip")
    page.locator("#upload-folder input[type=file]").set_input_files(str(folder))
    page.wait_for_function("() => document.querySelector('#upload-folder').innerText.includes('notes')")
    page.locator("#index-btn").click()
    page.wait_for_function("() => document.querySelector('#index-report').innerText.includes('images indexed')",
                           timeout=TIMEOUT_MS)
    report = page.locator("#index-report").inner_text()
    assert "browser-trip: 2 images indexed (2 new" in report and "notes.txt: not an image file type" in report
    assert page.locator("#gallery-choice input").input_value() == "browser-trip"

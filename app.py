"""Patch-query instance retrieval in the browser: crop a patch, search a gallery, see where it is.

    python app.py [--port 7860] [--data-dir DIR] [--checkpoint default|none|PATH] [--device auto|cpu|cuda]

Gradio wiring only; the work is done in ``retrieval/`` (``galleries`` for the named
galleries and uploads, ``search`` for the coarse-to-fine search, ``viz`` for pictures).
Per-user data lives in ``gr.State``; what the process shares (model, opened indexes) is
read-only while serving. Named API endpoints: ``/search``, ``/galleries``, ``/index``.
"""
from __future__ import annotations

import argparse
import html
import os
import sys
import threading
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # Hugging Face ZeroGPU (imported before torch, as it requires): spaces.GPU functions get a GPU
    import spaces
except ImportError:
    spaces = None

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from retrieval import viz  # noqa: E402
from retrieval.galleries import (DEMO, GalleryError, GalleryStore, cropped_query, default_data_dir,  # noqa: E402
                                 locate_crop, with_time_left)
from retrieval.images import ImageLoadError, load_image, parse_box, prepare_query  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEMO_ASSETS = ROOT / "assets" / "demo"
DETAIL_SIDE = 720          # px, long side of the result detail view
THUMB_SIDE = 300
CMAPS = ["jet", "turbo", "inferno", "viridis", "magma"]
# (object, query image, box on it or "") — one click each; tests check each finds its object at rank 1
EXAMPLES = [
    ("cat_face", "assets/demo/queries/cat_face.jpg", ""),
    ("coffee_cup", "assets/demo/queries/coffee_cup.jpg", ""),
    ("hubble_field", "assets/demo/queries/hubble_field.jpg", ""),
    ("mission_patch", "assets/demo/queries/mission_patch.jpg", ""),
    ("astronaut_face", "assets/demo/queries/scenes/astronaut_face_1.jpg", "329,120,456,270"),
]
INTRO = """# Patch-query instance retrieval
Drop, paste or upload a picture, **crop the object** with the editor's crop tool (image icon → crop,
drag the corners, confirm) — or upload an already-cropped patch — and press **Search**. Each result
shows where the object is: the fused heatmap, the P3/P4/P5 heatmaps and the top-K boxes.
Search the demo gallery or index your own folder below."""


def _gpu(fn):
    return spaces.GPU(fn) if spaces is not None else fn


def _user_error(exc: Exception, *uploads) -> gr.Error:
    """Errors a user caused get their message (upload paths shortened to file names); anything
    else is logged here with its traceback and summarised in the page."""
    if isinstance(exc, (GalleryError, ImageLoadError, ValueError)):
        message = str(exc)
        for path in uploads:
            if path:
                message = message.replace(str(path), Path(path).name)
        return gr.Error(html.escape(message, quote=False), title="Cannot do that", print_exception=False)
    traceback.print_exc()
    return gr.Error(html.escape(f"Something went wrong on the server ({type(exc).__name__}); please try again.",
                                quote=False), print_exception=False)


def _scales(text: str | None) -> tuple[float, ...] | None:
    if not text or not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"query scales '{text}' are not numbers; write e.g. 0.5, 1, 2") from None
    if not values or not all(0.05 <= v <= 8 for v in values):
        raise ValueError(f"query scales '{text}' must be numbers between 0.05 and 8, e.g. 0.5, 1, 2")
    return values


def _box(text: str | None):
    return parse_box(text) if text and text.strip() else None


def _editor_image(value) -> Image.Image:
    if not value or (value.get("composite") is None and value.get("background") is None):
        raise ImageLoadError("Upload, paste or drop a query image first (then crop the object).")
    img = value.get("composite") or value.get("background")
    if img.width < 1 or img.height < 1:
        raise ImageLoadError("The crop is empty; drag the crop corners around the object.")
    return img


def _result_record(store: GalleryStore, gallery: str, r) -> dict:
    return {"rank": r.rank, "name": store.display_path(gallery, r.path), "score": round(r.score, 5),
            "coarse_score": round(r.coarse_score, 5), "peak_score": round(r.peak_score, 5),
            "region_score": round(r.region_score, 5), "box": [round(v, 1) for v in r.box],
            "boxes": [[round(v, 1) for v in b] for b in r.boxes], "box_scores": [round(s, 5) for s in r.box_scores],
            "best_scale": r.best_scale, "size": list(r.size)}


def _open_result_image(r) -> Image.Image:
    try:
        return load_image(r.path)
    except ImageLoadError:  # the file went away after indexing: show a blank of the right size
        return Image.new("RGB", r.size, (200, 200, 200))


def _detail(store: GalleryStore, payload: dict | None, i: int, alpha: float, cmap: str):
    """(overlay with boxes, per-level panel, markdown, score plot) for result ``i`` of a search."""
    if not payload or not payload["results"]:
        return None, None, "", None
    results = payload["results"]
    i = max(0, min(int(i), len(results) - 1))
    r = results[i]
    img = _open_result_image(r)
    factor = min(1.0, DETAIL_SIDE / max(img.size))
    shown = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BILINEAR) \
        if factor < 1 else img
    fx = shown.width / r.size[0]
    overlay = viz.overlay_heatmap(shown, r.heatmap(shown.size), alpha=alpha, cmap=cmap)
    boxes = [[v * fx for v in b] for b in r.boxes]
    overlay = viz.draw_boxes(overlay, boxes, viz.box_labels(r.box_scores))
    small = (max(1, round(r.size[0] * 240 / r.size[1])), 240)
    panel = viz.level_panel(shown, r.level_heatmaps(small), alpha=max(alpha, 0.5), cmap=cmap)
    name = store.display_path(payload["gallery"], r.path)
    rows = "\n".join(f"| #{k + 1} | {b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f} | {s:.3f} |"
                     for k, (b, s) in enumerate(zip(r.boxes, r.box_scores)))
    text = (f"### #{r.rank} · `{name}` · score **{r.score:.3f}**\n"
            f"coarse score {r.coarse_score:.3f} (best region, first stage) · fine score {r.score:.3f} = "
            f"peak of the fused heatmap {r.peak_score:.3f} and region score (eq. 5) {r.region_score:.3f} · "
            f"best query scale ×{r.best_scale:g} · image {r.size[0]}×{r.size[1]} px\n\n"
            f"| box | x0, y0, x1, y1 (px) | box score (peak and look-alike) |\n|---|---|---|\n{rows}")
    plot = viz.score_plot([x.score for x in results], selected=i)
    return overlay, panel, text, plot


def build_app(store: GalleryStore) -> gr.Blocks:
    cfg = store.model.config

    def query_and_box(editor, source, box_text):
        """What to search for the page's query: (image, box in its pixels or None).

        A crop of the uploaded picture is found in it, and the picture is searched with the
        crop's box, so the search sees the object's surroundings and its scale; otherwise
        the crop is searched as a patch, scaled as its picture would be in the gallery."""
        image, box = _editor_image(editor), _box(box_text)
        if source is not None:
            found = locate_crop(source, image, cfg.max_side)
            if found is not None:
                if box is None:
                    return source, found
                return source, [box[0] + found[0], box[1] + found[1], box[2] + found[0], box[3] + found[1]]
        return cropped_query(image, source.size if source is not None else None, box, cfg.max_side, cfg.min_side)

    @_gpu
    def search_ui(editor, source, box_text, gallery, top, rerank, top_k, scales, gamma, refine, alpha, cmap):
        try:
            image, box = query_and_box(editor, source, box_text)
            response = store.engine(gallery).search(image, box, top=int(top), rerank=int(rerank), top_k=int(top_k),
                                                    query_scales=_scales(scales), gamma=float(gamma) or None,
                                                    refine_boxes=bool(refine))
        except Exception as exc:
            raise _user_error(exc) from None
        payload = {"gallery": gallery, "results": response.results}
        tiles = [(viz.thumbnail(_open_result_image(r), r.box, r.rank, r.score, THUMB_SIDE),
                  f"#{r.rank} {store.display_path(gallery, r.path)} · {r.score:.3f}") for r in response.results]
        t = response.timings_ms
        status = (f"{len(response.results)} results from **{gallery}** · query {response.query.width}×"
                  f"{response.query.height} px at scales {', '.join(f'{s:g}' for s in response.scales)} · "
                  + " · ".join(f"{k} {v:.0f} ms" for k, v in t.items()))
        return (response.query, tiles, status, payload, 0, *_detail(store, payload, 0, alpha, cmap))

    def preview(editor, source, box_text):
        try:
            image, box = query_and_box(editor, source, box_text)
            return prepare_query(image, box, cfg.max_side, min_side=cfg.min_side)
        except Exception:  # the preview stays empty until the query is usable; Search says why
            return None

    def remember_source(editor):
        return (editor or {}).get("background")

    def select_result(payload, alpha, cmap, evt: gr.SelectData):
        return (evt.index, *_detail(store, payload, evt.index, alpha, cmap))

    def redraw(payload, i, alpha, cmap):
        return _detail(store, payload, i, alpha, cmap)

    def galleries_table():
        return [[g.name, g.images, g.skipped, "ready" if g.ready else g.note] for g in store.list()]

    def refresh(current):
        names = store.names()
        return gr.update(choices=names, value=current if current in names else DEMO), galleries_table()

    @_gpu
    def index_ui(name, folder, files, progress=gr.Progress()):
        uploads = list(folder or []) + list(files or [])
        sink = with_time_left(lambda done, total, text: progress((done, total), desc=text, unit="images"))
        try:
            report = store.add_images(name, uploads, progress=sink)
        except Exception as exc:
            raise _user_error(exc) from None
        gallery = store.info(name).name
        lines = [f"**{gallery}**: {report.total_images} images indexed ({report.encoded} new, "
                 f"{report.unchanged} unchanged, {report.removed} removed) in {report.seconds:.1f} s."]
        if report.skipped:
            gr.Warning(f"{len(report.skipped)} file(s) skipped; see the list below the Index button.")
            lines.append(f"Skipped {len(report.skipped)} file(s):")
            lines += [f"- `{s['path']}`: {s['reason']}" for s in report.skipped[:50]]
            if len(report.skipped) > 50:
                lines.append(f"- … and {len(report.skipped) - 50} more")
        names = store.names()
        return "\n".join(lines), gr.update(choices=names, value=gallery), galleries_table()

    @_gpu
    def search_api(image, box: str = "", gallery: str = DEMO, top: float = 10, rerank: float = 100,
                   top_k: float = 5, scales: str = "", gamma: float = 0, refine: bool = True):
        """Search a gallery with an image file; ``box`` "x0,y0,x1,y1" crops it (its pixels);
        ``refine`` False reports the peak boxes instead of the learned refiner's."""
        try:
            if not image:
                raise ImageLoadError("Send a query image file.")
            response = store.engine(gallery or DEMO).search(
                image, _box(box), top=int(top or 10), rerank=int(rerank or cfg.rerank), top_k=int(top_k or 0) or None,
                query_scales=_scales(scales), gamma=float(gamma or 0) or None, refine_boxes=refine is not False)
        except Exception as exc:
            raise _user_error(exc, image) from None
        return {"gallery": gallery or DEMO, "query_size": list(response.query.size), "scales": response.scales,
                "timings_ms": {k: round(v, 1) for k, v in response.timings_ms.items()},
                "results": [_result_record(store, gallery or DEMO, r) for r in response.results]}

    def galleries_api():
        return [g.to_json() for g in store.list()]

    @_gpu
    def index_api(files, gallery: str):
        try:
            report = store.add_images(gallery, list(files or []))
        except Exception as exc:
            raise _user_error(exc) from None
        return {"gallery": store.info(gallery).name, "total_images": report.total_images,
                "encoded": report.encoded, "unchanged": report.unchanged, "removed": report.removed,
                "skipped": report.skipped, "seconds": round(report.seconds, 2)}

    with gr.Blocks(title="Patch-query instance retrieval", delete_cache=(1800, 3600)) as demo:
        source_state = gr.State(None)    # the picture as uploaded, before any crop
        payload = gr.State(None)         # this user's last search: gallery + results
        selected = gr.State(0)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=5):
                editor = gr.ImageEditor(label="Query: crop the object", type="pil", image_mode="RGB",
                                        sources=("upload", "clipboard"), transforms=("crop",), layers=False,
                                        height=430, elem_id="query-editor")
                with gr.Row():
                    box_text = gr.Textbox(label="…or a box x0,y0,x1,y1 on that image (optional)",
                                          placeholder="e.g. 120, 80, 260, 230", scale=3, elem_id="query-box")
                    query_shown = gr.Image(label="Query as searched", type="pil", interactive=False,
                                           height=150, scale=2, elem_id="query-shown")
                search_btn = gr.Button("Search", variant="primary", elem_id="search-btn")
            with gr.Column(scale=4):
                gallery = gr.Dropdown(label="Gallery", choices=store.names(), value=DEMO, elem_id="gallery-choice")
                with gr.Accordion("Search settings", open=False):
                    top = gr.Slider(1, 100, value=12, step=1, label="Number of results")
                    rerank = gr.Slider(1, 1000, value=cfg.rerank, step=1,
                                       label="Rerank depth (images passed to the fine stage)")
                    top_k = gr.Slider(1, 10, value=cfg.top_k, step=1, label="K peaks (boxes per image)")
                    scales = gr.Textbox(value=", ".join(f"{s:g}" for s in cfg.query_scales), label="Query scales")
                    gamma = gr.Slider(0, 50, value=0, step=0.5, label="γ of the fusion (0 = the model's learned γ)")
                    refine = gr.Checkbox(value=True, label="Refine each result's best box (learned refiner; "
                                                           "off: the query's size at the best scale)")
                examples = gr.Examples([[p, b, DEMO] for _, p, b in EXAMPLES], inputs=[editor, box_text, gallery],
                                       label="Examples (demo gallery): click one to search",
                                       example_labels=[o.replace("_", " ") for o, _, _ in EXAMPLES],
                                       cache_examples=False)
                status = gr.Markdown(elem_id="search-status")
        grid = gr.Gallery(label="Results (click one for its heatmaps)", columns=6, height="auto",
                          allow_preview=False, object_fit="contain", elem_id="results-grid")
        with gr.Row():
            with gr.Column(scale=3):
                overlay = gr.Image(label="Fused heatmap and top-K boxes", type="pil", interactive=False,
                                   elem_id="detail-overlay")
            with gr.Column(scale=2):
                detail_text = gr.Markdown(elem_id="detail-text")
                with gr.Row():
                    alpha = gr.Slider(0, 1, value=0.45, step=0.05, label="Heatmap opacity")
                    cmap = gr.Dropdown(CMAPS, value="jet", label="Colormap")
                plot = gr.Image(label="Scores down the ranking (circle: selected)", type="pil",
                                interactive=False, height=210, elem_id="score-plot")
        levels = gr.Image(label="P3 / P4 / P5 heatmaps", show_label=False, type="pil", interactive=False,
                          elem_id="detail-levels")

        with gr.Accordion("Your galleries: upload a folder, files or a zip", open=False, elem_id="upload-panel"):
            gr.Markdown("Images are indexed once (progress below); adding more to a gallery encodes only the "
                        "new ones. Unreadable or non-image files are skipped and listed.")
            with gr.Row():
                new_name = gr.Textbox(label="Gallery name", placeholder="my-photos", elem_id="gallery-name")
                folder = gr.File(label="Folder", file_count="directory", height=220, elem_id="upload-folder")
                files = gr.File(label="Image files or a zip", file_count="multiple", height=220,
                                elem_id="upload-files")
            index_btn = gr.Button("Index", variant="primary", elem_id="index-btn")
            index_report = gr.Markdown(elem_id="index-report")
            table = gr.Dataframe(headers=["gallery", "images", "skipped", "status"], value=galleries_table(),
                                 interactive=False, label="Galleries")

        with gr.Column(visible=False):   # inputs/outputs of the API endpoints
            api_image = gr.File(label="image", file_count="single")
            api_box = gr.Textbox(label="box", value="")
            api_gallery = gr.Textbox(label="gallery", value=DEMO)
            api_top = gr.Number(label="top", value=10, precision=0)
            api_rerank = gr.Number(label="rerank", value=cfg.rerank, precision=0)
            api_top_k = gr.Number(label="top_k", value=cfg.top_k, precision=0)
            api_scales = gr.Textbox(label="scales", value="")
            api_gamma = gr.Number(label="gamma", value=0)
            api_refine = gr.Checkbox(label="refine", value=True)
            api_files = gr.File(label="files", file_count="multiple")
            api_name = gr.Textbox(label="gallery", value="")
            api_out = gr.JSON(label="result")
            api_search_btn, api_galleries_btn, api_index_btn = gr.Button(), gr.Button(), gr.Button()

        search_inputs = [editor, source_state, box_text, gallery, top, rerank, top_k, scales, gamma, refine, alpha,
                         cmap]
        search_outputs = [query_shown, grid, status, payload, selected, overlay, levels, detail_text, plot]
        search_opts = dict(concurrency_id="search", concurrency_limit=4, api_visibility="undocumented")
        search_btn.click(search_ui, search_inputs, search_outputs, api_name="search_ui", **search_opts)
        examples.load_input_event.then(remember_source, editor, source_state, api_visibility="private").then(
            search_ui, search_inputs, search_outputs, **{**search_opts, "api_visibility": "private"})
        editor.upload(remember_source, editor, source_state, api_visibility="private")
        editor.clear(lambda: None, None, source_state, api_visibility="private")
        for trigger in (editor.change, box_text.submit):
            trigger(preview, [editor, source_state, box_text], query_shown, api_visibility="private",
                    trigger_mode="always_last")
        grid.select(select_result, [payload, alpha, cmap], [selected, overlay, levels, detail_text, plot],
                    api_visibility="private")
        for trigger in (alpha.release, cmap.change):
            trigger(redraw, [payload, selected, alpha, cmap], [overlay, levels, detail_text, plot],
                    api_visibility="private")
        index_btn.click(index_ui, [new_name, folder, files], [index_report, gallery, table],
                        concurrency_id="index", concurrency_limit=2, api_visibility="private")
        demo.load(refresh, gallery, [gallery, table], api_visibility="private")

        api_search_btn.click(search_api, [api_image, api_box, api_gallery, api_top, api_rerank, api_top_k,
                                          api_scales, api_gamma, api_refine], api_out, api_name="search",
                             concurrency_id="search", concurrency_limit=4)
        api_galleries_btn.click(galleries_api, None, api_out, api_name="galleries")
        api_index_btn.click(index_api, [api_files, api_name], api_out, api_name="index",
                            concurrency_id="index", concurrency_limit=2)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Patch-query instance retrieval app (Gradio).")
    p.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1, $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, $GRADIO_SERVER_PORT)")
    p.add_argument("--data-dir", default=None,
                   help="where user galleries live (default $RETRIEVAL_DATA_DIR, /data/user_galleries on a "
                        "Space with persistent storage, else ./user_galleries)")
    p.add_argument("--checkpoint", default="default", help="'default' (assets/checkpoint.pt), 'none' or a path")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-warmup", action="store_true", help="skip the background warm-up search")
    return p.parse_args(argv)


def _warm_up(store: GalleryStore) -> None:
    """One small search in the background so the first user's search does not pay for lazy loading."""
    try:
        store.engine(DEMO).search(DEMO_ASSETS / "queries" / "cat_face.jpg", top=1, rerank=2)
    except Exception as exc:  # the demo may still be rebuilding; the first real search will load it
        print(f"warm-up skipped: {exc}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from retrieval.checkpoint import default_device, load_model

    device = default_device() if args.device == "auto" else torch.device(args.device)
    model, model_hash = load_model(args.checkpoint, device=device)
    data_dir = Path(args.data_dir).resolve() if args.data_dir else default_data_dir()
    store = GalleryStore(data_dir, model, model_hash, device)
    print(f"model {model_hash} on {device}; galleries in {data_dir}; {store.prepare_demo(background=True)}",
          flush=True)
    demo = build_app(store)
    demo.queue(default_concurrency_limit=8, max_size=256)
    if not args.no_warmup:
        threading.Thread(target=_warm_up, args=(store,), daemon=True).start()
    demo.launch(server_name=args.host, server_port=args.port, ssr_mode=False, max_file_size="1gb",
                allowed_paths=[str(DEMO_ASSETS)], blocked_paths=[str(data_dir), str(ROOT / "gallery_index")],
                footer_links=["api", "settings"])


if __name__ == "__main__":
    main()

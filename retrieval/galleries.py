"""Named galleries for the app: the bundled demo and the user's own, kept in a data directory.

Layout of a user gallery (the folder is also its index root, see ``index.py``)::

    <data_dir>/<name>/manifest.json, chunks/ (+ regions-*.faiss)  the index
    <data_dir>/<name>/files/…                                    the uploaded images

Uploads are copied into ``files/`` under sanitised names (zips through
``build.extract_zip``, which rejects entries that would land outside), then the index
is brought in line with ``files/`` by ``build_index``: only new or changed images are
encoded, so adding images is incremental. Files that turn out unreadable are removed
again and reported. A gallery that ends up with no image is not kept.

The demo gallery is read-only and served from the prebuilt ``gallery_index/demo``; when
that index was built with another model than the one loaded, it is rebuilt once into
``<data_dir>/_demo`` (in a background thread, so the app starts at once).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .build import BuildReport, UnsafeArchive, build_index, extract_zip
from .images import IMAGE_EXTENSIONS, ImageLoadError, resize_scale
from .index import MANIFEST, GalleryIndex, IndexLoadError, ModelMismatch, content_hash
from .model import RetrievalModel
from .search import SearchEngine

REPO = Path(__file__).resolve().parent.parent
BUNDLED_DEMO_INDEX = REPO / "gallery_index" / "demo"
DEMO_IMAGES = REPO / "assets" / "demo" / "gallery"
DEMO = "demo"
REBUILT_DEMO = "_demo"            # names starting with "_" are never user galleries
FILES = "files"
MAX_NAME = 48
MAX_FILE_NAME = 120

Progress = Callable[[int, int, str], None]   # (done, total, message)


class GalleryError(ValueError):
    """Something the user can fix: a bad name, an upload without images, an unknown gallery."""


class GalleryNotReady(GalleryError):
    """The gallery exists but its index is being (re)built right now."""


def default_data_dir() -> Path:
    """``$RETRIEVAL_DATA_DIR``; else ``/data/user_galleries`` on a Hugging Face Space with
    persistent storage (``/data`` writable); else ``./user_galleries``."""
    env = os.environ.get("RETRIEVAL_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    data = Path("/data")
    if os.environ.get("SPACE_ID") and data.is_dir() and os.access(data, os.W_OK):
        return data / "user_galleries"
    return Path("user_galleries").resolve()


def safe_gallery_name(name: str | None) -> str:
    """A gallery name usable as one folder name: lower case letters, digits, ``-`` and ``_``.

    Spaces become ``-``; anything else (slashes, dots, ``..``) is refused with a message
    rather than silently rewritten, so the user knows which gallery they get.
    """
    text = unicodedata.normalize("NFKC", (name or "").strip()).lower()
    text = re.sub(r"\s+", "-", text)
    if not text:
        raise GalleryError("Give the gallery a name (letters, digits, - or _).")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", text) or len(text) > MAX_NAME:
        raise GalleryError(f"'{name}' is not a usable gallery name: use up to {MAX_NAME} letters, digits, "
                           "- or _, starting with a letter or digit.")
    return text


def safe_file_name(name: str) -> str:
    """The last path component of an uploaded file's name, reduced to ``[A-Za-z0-9._-]``.

    Never empty, never starting with a dot, at most ``MAX_FILE_NAME`` characters with
    the extension kept, so it cannot name a hidden file or leave its folder.
    """
    base = unicodedata.normalize("NFKC", name).replace("\\", "/").split("/")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    ext = ext[:10]
    stem = stem[:MAX_FILE_NAME - len(ext) - 1] or "file"
    return f"{stem}.{ext}" if ext else stem


def _valid_name(name: str) -> bool:
    try:
        return safe_gallery_name(name) == name
    except GalleryError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return folder == path or folder in path.parents


def _copy_unique(src: Path, folder: Path) -> Path:
    """Copy ``src`` into ``folder`` under its safe name; an existing file with the same
    content is reused, one with other content gets the content hash appended."""
    name = safe_file_name(src.name)
    target = folder / name
    if target.exists():
        sha = content_hash(src)
        if target.is_file() and content_hash(target) == sha:
            return target
        stem, ext = os.path.splitext(name)
        target = folder / f"{stem}-{sha[:10]}{ext}"
        if target.exists():
            return target
    if not _inside(target, folder):
        raise GalleryError(f"refusing to write '{src.name}' outside the gallery folder")
    tmp = folder / f".{target.name}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    return target


def save_uploads(uploads: Sequence[str | os.PathLike], files_dir: Path,
                 progress: Progress | None = None) -> tuple[list[Path], list[dict]]:
    """Copy uploaded image files and the images of uploaded zips into ``files_dir``.

    Returns (saved image paths, skipped entries ``{"path", "reason"}``). Files whose
    extension is not an image's are skipped, not opened; whether an image file really
    is one is decided later by the index build.
    """
    files_dir.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    skipped: list[dict] = []
    total = len(uploads)
    for i, upload in enumerate(uploads):
        src = Path(upload)
        shown = src.name
        suffix = src.suffix.lower()
        if not src.is_file():
            skipped.append({"path": shown, "reason": "not a file"})
        elif suffix == ".zip":
            dest = files_dir / safe_file_name(src.stem)
            try:
                got, bad = extract_zip(src, dest)
            except UnsafeArchive as exc:
                skipped.append({"path": shown, "reason": str(exc).replace(str(src), shown)})
            else:
                saved.extend(got)
                skipped.extend({"path": f"{shown}/{b['path']}", "reason": b["reason"]} for b in bad)
                if not got and not bad:
                    skipped.append({"path": shown, "reason": "the zip holds no image files"})
        elif suffix not in IMAGE_EXTENSIONS:
            skipped.append({"path": shown, "reason": f"not an image file type ({suffix or 'no extension'})"})
        else:
            saved.append(_copy_unique(src, files_dir))
        if progress is not None and (i % 20 == 0 or i + 1 == total):
            progress(i + 1, total, "saving uploaded files")
    return saved, skipped


def locate_crop(source: Image.Image, crop: Image.Image, max_side: int,
                max_error: float = 0.02) -> list[float] | None:
    """Where ``crop``, cut from ``source`` without scaling, lies in it: ``[x0, y0, x1, y1]`` in
    ``source`` pixels, or ``None`` when it is not a proper part of it.

    The page's crop tool hands over the cropped pixels only; finding them in the picture
    that was uploaded lets the search see the object's surroundings and its scale. The
    match runs at the gallery scale (long side ``max_side``), where the search works
    anyway; a crop counts as found when its normalised squared difference there is at most
    ``max_error`` (the browser re-encodes images, so not exactly zero).
    """
    import cv2
    import numpy as np

    if crop.size == source.size or crop.width > source.width or crop.height > source.height:
        return None
    factor = resize_scale(source.width, source.height, max_side)
    small = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
    if min(small) < 4:
        return None
    src = source if factor >= 1.0 else source.resize(
        (max(1, round(source.width * factor)), max(1, round(source.height * factor))), Image.BILINEAR)
    tpl = crop if factor >= 1.0 else crop.resize(small, Image.BILINEAR)
    if tpl.width > src.width or tpl.height > src.height:
        return None
    grey = lambda im: np.asarray(im.convert("L"), dtype=np.float32)  # noqa: E731
    errors = cv2.matchTemplate(grey(src), grey(tpl), cv2.TM_SQDIFF_NORMED)
    error, _, (x, y), _ = cv2.minMaxLoc(errors)
    if error > max_error:
        return None
    x0, y0 = min(round(x / factor), source.width - crop.width), min(round(y / factor), source.height - crop.height)
    return [float(x0), float(y0), float(x0 + crop.width), float(y0 + crop.height)]


def cropped_query(image: Image.Image, source_size: tuple[int, int] | None, box: Sequence[float] | None,
                  max_side: int, min_side: int = 8) -> tuple[Image.Image, list[float] | None]:
    """The ``(image, box)`` to search for a query cropped in the page.

    The page hands over only the cropped pixels; ``source_size`` is the (width, height)
    of the picture they were cut from. They are resized by the factor the gallery rule
    (long side to ``max_side``) gives that picture, so the object gets the scale it has in
    gallery images, as ``images.prepare_query`` does for a box. ``box`` (in ``image``
    pixels, optional) is scaled along. Without a larger source the image is returned as is.
    """
    factor = 1.0
    if source_size and image.width <= source_size[0] and image.height <= source_size[1]:
        factor = resize_scale(source_size[0], source_size[1], max_side)
    if factor >= 1.0:
        return image, list(box) if box is not None else None
    width, height = max(1, round(image.width * factor)), max(1, round(image.height * factor))
    if box is None and min(width, height) < min_side:
        raise ImageLoadError(
            f"the crop is {image.width}×{image.height} px of a {source_size[0]}×{source_size[1]} picture; at the "
            f"gallery scale (long side {max_side} px) that is {width}×{height} px, below the {min_side} px "
            "minimum: crop a larger region")
    return image.resize((width, height), Image.BICUBIC), [v * factor for v in box] if box is not None else None


def progress_text(phase: str, done: int, total: int, elapsed: float) -> str:
    """``"indexing 120/2000 images · about 3 min left"`` from the rate so far."""
    text = f"{phase} {done}/{total} images"
    if 0 < done < total and elapsed > 0:
        left = elapsed / done * (total - done)
        text += f" · about {left:.0f} s left" if left < 90 else f" · about {left / 60:.0f} min left"
    return text


@dataclass
class GalleryInfo:
    name: str
    images: int
    skipped: int
    builtin: bool
    ready: bool
    note: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class GalleryStore:
    """The galleries one app process serves.

    Holds no per-user state: the engine cache only memoises opened indexes (an engine
    is stateless), keyed by the manifest file's identity so a commit is picked up.
    """

    def __init__(self, data_dir: str | os.PathLike, model: RetrievalModel, model_hash: str,
                 device: str | torch.device = "cpu", demo_index: Path = BUNDLED_DEMO_INDEX,
                 demo_images: Path = DEMO_IMAGES) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.model = model
        self.model_hash = model_hash
        self.device = torch.device(device)
        self.demo_index = Path(demo_index)
        self.demo_images = Path(demo_images).resolve()
        self._guard = threading.Lock()
        self._engines: dict[str, tuple[tuple, SearchEngine]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._demo_thread: threading.Thread | None = None
        self._demo_progress = (0, 0)
        self._demo_error: str | None = None

    # ---- the demo gallery -------------------------------------------------------
    def _bundled_demo_ok(self) -> bool:
        manifest = _read_manifest(self.demo_index)
        return manifest is not None and manifest.get("model_hash") == self.model_hash

    def _rebuilt_demo_ok(self) -> bool:
        manifest = _read_manifest(self.data_dir / REBUILT_DEMO)
        return (manifest is not None and manifest.get("model_hash") == self.model_hash
                and len(manifest.get("images", [])) > 0)

    def demo_root(self) -> Path:
        return self.demo_index if self._bundled_demo_ok() else self.data_dir / REBUILT_DEMO

    def prepare_demo(self, background: bool = True) -> str:
        """Make the demo searchable with the loaded model; returns what was done.

        The bundled index is used when its model hash matches; otherwise the demo
        images are re-encoded into ``<data_dir>/_demo`` (once; later starts reuse it).
        """
        if self._bundled_demo_ok():
            return "bundled demo index matches the model"
        if self._rebuilt_demo_ok():
            return f"using the demo index rebuilt for this model in {self.data_dir / REBUILT_DEMO}"
        with self._guard:
            if self._demo_thread is None or not self._demo_thread.is_alive():
                self._demo_error = None
                self._demo_thread = threading.Thread(target=self._rebuild_demo, name="demo-rebuild", daemon=True)
                self._demo_thread.start()
            thread = self._demo_thread
        if not background:
            thread.join()
            if self._demo_error:
                raise GalleryError(self._demo_error)
        return (f"the bundled demo index was built with another model; rebuilding it for model "
                f"{self.model_hash} into {self.data_dir / REBUILT_DEMO}")

    def _rebuild_demo(self) -> None:
        def progress(done: int, total: int, _msg: str) -> None:
            self._demo_progress = (done, total)

        try:
            build_index(self.data_dir / REBUILT_DEMO, self.demo_images, self.model, self.model_hash,
                        rebuild=True, device=self.device, progress=progress, show_bar=False)
        except Exception as exc:  # reported to users on their next demo search
            self._demo_error = f"rebuilding the demo index failed: {exc}"

    # ---- listing --------------------------------------------------------------------
    def user_gallery_names(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        names = []
        for d in sorted(self.data_dir.iterdir()):
            if d.is_dir() and _valid_name(d.name) and (d / MANIFEST).is_file():
                names.append(d.name)
        return names

    def names(self) -> list[str]:
        return [DEMO] + [n for n in self.user_gallery_names() if n != DEMO]

    def info(self, name: str) -> GalleryInfo:
        builtin = name == DEMO
        name = name if builtin else safe_gallery_name(name)
        root = self.demo_root() if builtin else self.data_dir / name
        manifest = _read_manifest(root)
        if manifest is None:
            note = self._demo_status() if builtin else "no index"
            return GalleryInfo(name, 0, 0, builtin, False, note)
        ready = manifest.get("model_hash") == self.model_hash
        note = "" if ready else "indexed with another model: upload again (or press Index) to re-encode"
        return GalleryInfo(name, len(manifest.get("images", [])), len(manifest.get("skipped", [])),
                           builtin, ready, note)

    def list(self) -> list[GalleryInfo]:
        return [self.info(n) for n in self.names()]

    def _demo_status(self) -> str:
        if self._demo_error:
            return self._demo_error
        done, total = self._demo_progress
        return f"the demo index is being rebuilt for the current model ({done}/{total or '?'} images)"

    # ---- searching ------------------------------------------------------------------
    def root(self, name: str) -> Path:
        """Index folder of gallery ``name`` (validated)."""
        if name == DEMO:
            return self.demo_root()
        return self.data_dir / safe_gallery_name(name)

    def engine(self, name: str | None) -> SearchEngine:
        """A search engine over gallery ``name``, reopened only when its manifest changed."""
        if not name:
            raise GalleryError("Choose a gallery to search (the demo, or upload your own images first).")
        root = self.root(name)
        manifest = root / MANIFEST
        try:
            st = manifest.stat()
        except FileNotFoundError:
            if name == DEMO:
                self.prepare_demo(background=True)
                raise GalleryNotReady(self._demo_status() + "; try again in a minute.") from None
            raise GalleryError(f"There is no gallery named '{name}'. Upload images to create it.") from None
        key = (str(root), st.st_ino, st.st_mtime_ns, st.st_size)
        with self._guard:
            cached = self._engines.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
        try:
            index = GalleryIndex.open(root, model_hash=self.model_hash)
        except ModelMismatch:
            raise GalleryError(f"The gallery '{name}' was indexed with another model than the one loaded "
                               f"({self.model_hash}); press Index on it (no files needed) to re-encode it.") from None
        except IndexLoadError as exc:
            raise GalleryError(f"The gallery '{name}' cannot be opened: {exc}") from None
        if len(index) == 0:
            raise GalleryError(f"The gallery '{name}' holds no images yet; upload some first.")
        engine = SearchEngine(index, self.model, self.device)
        with self._guard:
            self._engines[name] = (key, engine)
        return engine

    def forget(self, name: str) -> None:
        """Drop a cached engine (its files changed under it)."""
        with self._guard:
            self._engines.pop(name, None)

    def display_path(self, name: str, path: Path) -> str:
        """A result's file as the user knows it (relative to the gallery's images), never a server path."""
        base = self.demo_images if name == DEMO else (self.data_dir / safe_gallery_name(name) / FILES).resolve()
        try:
            return Path(path).resolve().relative_to(base).as_posix()
        except ValueError:
            return Path(path).name

    # ---- adding images -----------------------------------------------------------------
    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def add_images(self, name: str, uploads: Sequence[str | os.PathLike],
                   progress: Progress | None = None) -> BuildReport:
        """Copy ``uploads`` (image files, zips) into gallery ``name`` and index what is new.

        With no uploads, an existing gallery is re-indexed from its files (re-encoded if
        the model changed). Raises :class:`GalleryError` for a bad name, the read-only
        demo, or an upload without a single usable image (a new gallery is then not kept).
        """
        name = safe_gallery_name(name)
        if name == DEMO:
            raise GalleryError("The demo gallery is read-only; give your gallery another name.")
        gallery = self.data_dir / name
        with self._lock(name):
            existed = GalleryIndex.exists(gallery)
            if not uploads and not existed:
                raise GalleryError("Choose a folder, some image files or a zip to upload first.")
            created = not gallery.exists()
            files = gallery / FILES
            try:
                saved, skipped = save_uploads(list(uploads), files, progress)
                if uploads and not saved:
                    raise GalleryError("No images in the upload. " + skipped_summary(skipped))
                manifest = _read_manifest(gallery)
                rebuild = manifest is not None and manifest.get("model_hash") != self.model_hash
                report = build_index(gallery, files, self.model, self.model_hash, rebuild=rebuild,
                                     device=self.device, progress=progress, show_bar=False)
            except BaseException:
                if created:
                    shutil.rmtree(gallery, ignore_errors=True)
                raise
            files_abs = files.resolve()
            for item in report.skipped:
                bad = Path(item["path"]).resolve()
                if _inside(bad, files_abs):   # an unusable upload: do not keep it or retry it next time
                    bad.unlink(missing_ok=True)
                    shown = bad.relative_to(files_abs).as_posix()
                    item["reason"] = item["reason"].replace(item["path"], shown)
                    item["path"] = shown
            report.skipped = skipped + report.skipped
            if report.total_images == 0:
                if created:
                    shutil.rmtree(gallery, ignore_errors=True)
                raise GalleryError("None of the uploaded files is a usable image. " + skipped_summary(report.skipped))
        self.forget(name)
        return report


def skipped_summary(skipped: Sequence[dict], limit: int = 5) -> str:
    """``"Skipped 3 files: a.txt (not an image file type (.txt)); …"``, at most ``limit`` named."""
    if not skipped:
        return ""
    parts = [f"{s['path']} ({s['reason']})" for s in skipped[:limit]]
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"Skipped {len(skipped)} file(s): " + "; ".join(parts) + more + "."


def with_time_left(progress: Callable[[int, int, str], None]) -> Progress:
    """Wrap a ``(done, total, text)`` sink so each message carries the time left for its phase."""
    t0 = time.perf_counter()
    state = {"phase": None, "start": t0, "last": t0}

    def report(done: int, total: int, message: str) -> None:
        now = time.perf_counter()
        phase = "saving" if message.startswith("saving") else "indexing"
        if phase != state["phase"]:   # a phase starts where the previous one reported last
            state["phase"], state["start"] = phase, state["last"]
        state["last"] = now
        progress(done, total, progress_text(phase, done, total, now - state["start"]))

    return report

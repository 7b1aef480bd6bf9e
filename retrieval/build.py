"""Building and updating a gallery index from a folder, a list of files or a zip.

Only new or changed files (by content hash) are encoded; unreadable, corrupt, tiny or
non-image files are skipped and listed; progress is committed every
``commit_every`` images, so an interrupted build keeps what it finished.
"""
from __future__ import annotations

import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from .encoding import encode_gallery_images
from .images import IMAGE_EXTENSIONS, ImageLoadError, list_image_files, load_image
from .index import GalleryIndex, ImageRecord, ModelMismatch, content_hash
from .model import RetrievalModel

Progress = Callable[[int, int, str], None]   # (done, total, message)

MAX_ZIP_BYTES = 8 << 30           # refuse archives that would unpack to more than this
MAX_ZIP_ENTRY_BYTES = 512 << 20


class UnsafeArchive(ValueError):
    """A zip whose content would unpack outside its folder or is implausibly large."""


def _unsafe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def extract_zip(archive: str | os.PathLike, dest: str | os.PathLike) -> tuple[list[Path], list[dict]]:
    """Unpack the image files of ``archive`` under ``dest``.

    Entries with absolute paths, drive letters or ``..`` are rejected (listed, never
    written); so is an archive that would unpack to more than 8 GiB.
    Returns (extracted image paths, skipped entries with reasons).
    """
    dest = Path(dest).resolve()
    extracted, skipped = [], []
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchive(f"'{archive}' is not a readable zip file: {exc}") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise UnsafeArchive(f"'{archive}' would unpack to more than {MAX_ZIP_BYTES >> 30} GiB")
        for m in members:
            if _unsafe_member(m.filename):
                skipped.append({"path": m.filename, "reason": "unsafe path in zip (absolute or '..'), rejected"})
                continue
            if Path(m.filename).suffix.lower() not in IMAGE_EXTENSIONS or \
                    any(part.startswith((".", "__MACOSX")) for part in PurePosixPath(m.filename).parts):
                continue
            if m.file_size > MAX_ZIP_ENTRY_BYTES:
                skipped.append({"path": m.filename, "reason": "file too large"})
                continue
            target = (dest / m.filename).resolve()
            if dest not in target.parents:
                skipped.append({"path": m.filename, "reason": "unsafe path in zip, rejected"})
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                out.write(src.read())
            extracted.append(target)
    return extracted, skipped


def collect_sources(sources: str | os.PathLike | Sequence[str | os.PathLike],
                    extract_to: Path) -> tuple[list[Path], list[dict]]:
    """Expand folders (recursively) and zips into image file paths; other paths are kept as given."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    skipped: list[dict] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files.extend(list_image_files(p))
        elif p.suffix.lower() == ".zip":
            got, bad = extract_zip(p, extract_to / p.stem)
            files.extend(got)
            skipped.extend(bad)
        elif p.exists():
            files.append(p)
        else:
            skipped.append({"path": str(p), "reason": "no such file or folder"})
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, skipped


@dataclass
class BuildReport:
    encoded: int = 0                   # images run through the network
    unchanged: int = 0                 # already indexed with the same content
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    total_images: int = 0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path.resolve(), root.resolve())


CHUNK_IMAGES = 16   # images per feature-store file: ~13 MB at 640×480, small enough for git and Spaces


def _write_chunks(index: GalleryIndex, items: list) -> list[ImageRecord]:
    return [rec for start in range(0, len(items), CHUNK_IMAGES)
            for rec in index.write_chunk(items[start:start + CHUNK_IMAGES])]


def build_index(index_root: str | os.PathLike, sources, model: RetrievalModel, model_hash: str,
                add: bool = False, rebuild: bool = False, device: str | torch.device = "cpu",
                batch_size: int = 8, commit_every: int = 256, progress: Progress | None = None,
                show_bar: bool = True) -> BuildReport:
    """Create or update the index at ``index_root`` from ``sources``.

    Without ``add`` the index ends up holding exactly the readable images of ``sources``
    (files gone from them are removed); with ``add`` they are added to what it holds.
    ``rebuild`` re-encodes everything, as needed after a model change; otherwise an
    index built with another model raises :class:`ModelMismatch`.
    """
    root = Path(index_root)
    started = time.perf_counter()
    report = BuildReport()
    with GalleryIndex.locked(root, wait=lambda: print(f"waiting for another process writing '{root}' …",
                                                          file=sys.stderr)):
        if GalleryIndex.exists(root) and not rebuild:
            index = GalleryIndex.open(root)
            if index.model_hash != model_hash:
                raise ModelMismatch(
                    f"the index '{root}' was built with model {index.model_hash}, but the current model is "
                    f"{model_hash}; run again with --rebuild to re-encode it with the current model")
        else:
            index = GalleryIndex.empty(root, model_hash, model.config)
        files, skipped = collect_sources(sources, root / "files")
        kept: list[ImageRecord] = list(index.images) if add else []
        by_path = {rec.path: rec for rec in index.images}
        todo: list[tuple[Path, str, str]] = []
        for f in files:
            rel = _relative(f, root)
            try:
                sha = content_hash(f)
            except OSError as exc:
                skipped.append({"path": str(f), "reason": f"unreadable: {exc}"})
                continue
            old = by_path.get(rel)
            if old is not None and old.sha == sha:
                report.unchanged += 1
                if not add:
                    kept.append(old)
                continue
            if old is not None and add:
                kept = [r for r in kept if r.path != rel]
            todo.append((f, rel, sha))
        present = {rel for _, rel, _ in todo} | {r.path for r in kept}
        report.removed = sum(1 for rec in index.images if rec.path not in present)
        bar = tqdm(total=len(todo), desc=f"indexing {root.name}", unit="img", disable=not show_bar)
        pending: list[tuple[str, str, int, int, object]] = []
        done_since_commit = 0
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            loaded = []
            for f, rel, sha in batch:
                try:
                    img = load_image(f, min_side=model.config.min_side, max_pixels=model.config.max_pixels)
                    loaded.append((rel, sha, img))
                except ImageLoadError as exc:
                    skipped.append({"path": str(f), "reason": str(exc)})
            if loaded:
                encoded = encode_gallery_images(model, [img for _, _, img in loaded], device=device,
                                                batch_size=batch_size)
                for (rel, sha, img), enc in zip(loaded, encoded):
                    pending.append((rel, sha, img.width, img.height, enc))
                report.encoded += len(loaded)
                done_since_commit += len(loaded)
            bar.update(len(batch))
            if progress is not None:
                progress(min(start + len(batch), len(todo)), len(todo), f"indexed {report.encoded} images")
            if done_since_commit >= commit_every:
                kept.extend(_write_chunks(index, pending))
                index.commit(kept, skipped, time.perf_counter() - started)
                pending, done_since_commit = [], 0
        bar.close()
        if pending:
            kept.extend(_write_chunks(index, pending))
        report.seconds = time.perf_counter() - started
        index.commit(kept, skipped, report.seconds)
        report.skipped = skipped
        report.total_images = len(kept)
        for item in skipped:
            print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    return report


def remove_images(index_root: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> int:
    """Remove images (by their file path) from the index; returns how many were removed."""
    root = Path(index_root)
    with GalleryIndex.locked(root):
        index = GalleryIndex.open(root)
        drop = {_relative(Path(p), root) for p in paths}
        kept = [r for r in index.images if r.path not in drop]
        removed = len(index.images) - len(kept)
        index.commit(kept, index.manifest.get("skipped", []))
    return removed


def build_index_from_images(index_root: str | os.PathLike, items: Sequence[tuple[str, "Image.Image"]],
                            model: RetrievalModel, model_hash: str, device: str | torch.device = "cpu",
                            batch_size: int = 8, show_bar: bool = True) -> tuple[GalleryIndex, BuildReport]:
    """Index already-loaded ``(key, image)`` pairs (a benchmark's gallery); ``key`` is stored as the path.

    An index at ``index_root`` built by the same model over the same keys is reused as is.
    """
    root = Path(index_root)
    keys = [k for k, _ in items]
    report = BuildReport()
    started = time.perf_counter()
    with GalleryIndex.locked(root):
        if GalleryIndex.exists(root):
            old = GalleryIndex.open(root)
            if old.model_hash == model_hash and [r.path for r in old.images] == keys:
                report.unchanged = len(keys)
                report.total_images = len(keys)
                return old, report
        index = GalleryIndex.empty(root, model_hash, model.config)
        records: list[ImageRecord] = []
        for start in tqdm(range(0, len(items), batch_size), desc=f"indexing {root.name}", unit="batch",
                          disable=not show_bar):
            batch = items[start:start + batch_size]
            encoded = encode_gallery_images(model, [img for _, img in batch], device=device, batch_size=batch_size)
            records.extend(_write_chunks(index, [(key, "", img.width, img.height, enc)
                                                 for (key, img), enc in zip(batch, encoded)]))
        report.seconds = time.perf_counter() - started
        report.encoded = report.total_images = len(records)
        index.commit(records, [], report.seconds)
    return GalleryIndex.open(root), report

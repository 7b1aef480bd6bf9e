"""Checkpoints of the trained heads, and the one function that builds a ready model.

Format (``torch.save`` of a dict, a few MB; the pretrained backbone is not stored):

    {"format": "patch-retrieval-heads/1",
     "config": RetrievalConfig.to_dict(),     # what the heads were trained with
     "state": {name: tensor},                 # RetrievalModel.head_state_dict()
     "meta": {...}}                           # training command, data split, steps, metrics …

A model is identified by ``model_hash``: the SHA-256 of the checkpoint file's bytes
(first 16 hex digits), or ``untrained-<hash of the config's model fields>``. Indexes
store it, so features computed by one model are never searched with another.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import RetrievalConfig
from .model import RetrievalModel

FORMAT = "patch-retrieval-heads/1"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, of another format, or does not fit the model."""


def file_hash(path: str | os.PathLike, digits: int = 16) -> str:
    """The first ``digits`` hex digits of the file's SHA-256 (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:digits]


# bumped when the untrained heads change: "seeded" since their random parts are drawn under a
# fixed seed (before, every process drew its own, so an untrained index could not be trusted)
UNTRAINED_INIT = "seeded-1"


def untrained_hash(config: RetrievalConfig) -> str:
    """Names the untrained heads by their config and init version, not their bytes: the seeded
    orthogonal init goes through a QR decomposition whose last bits depend on the thread count
    and the CPU, which changes nothing a search computes but would change a hash of the weights."""
    key = config.model_fingerprint() + UNTRAINED_INIT
    return "untrained-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(model: RetrievalModel, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> str:
    """Save the heads and config atomically; returns the new file's ``model_hash``."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "config": model.config.to_dict(),
                "state": {k: v.detach().cpu() for k, v in model.head_state_dict().items()},
                # plain JSON types only: the file must load with torch.load(weights_only=True)
                "meta": json.loads(json.dumps(meta or {}, default=str))}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return file_hash(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"checkpoint '{path}' is not readable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not a {FORMAT} file")
    return data


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path | None:
    """``None``/"default" → the shipped checkpoint if present; "none" → untrained heads."""
    if checkpoint is None or str(checkpoint) == "default":
        return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None
    if str(checkpoint).lower() == "none":
        return None
    return Path(checkpoint)


def load_model(checkpoint: str | os.PathLike | None = "default", device: str | torch.device = "cpu",
               config: RetrievalConfig | None = None) -> tuple[RetrievalModel, str]:
    """A ready ``(model in eval mode, model_hash)``.

    ``config`` overrides only search-time fields of a checkpoint's config; the model
    fields (backbone, channels, …) always come from the checkpoint.
    """
    path = resolve_checkpoint(checkpoint)
    if path is None:
        cfg = config or RetrievalConfig()
        model = RetrievalModel(cfg)
        model_hash = untrained_hash(cfg)
    else:
        data = read_checkpoint(path)
        cfg = RetrievalConfig.from_dict(data["config"])
        if config is not None:
            model_fields = set(json.loads(cfg.model_fingerprint()))
            cfg = cfg.replace(**{k: v for k, v in config.to_dict().items() if k not in model_fields})
        model = RetrievalModel(cfg)
        missing, unexpected = model.load_state_dict(data["state"], strict=False)
        # a checkpoint from before the box refiner existed: its refiner stays at its init, which
        # changes no box, i.e. exactly the boxes that checkpoint was trained and validated with
        missing = [k for k in missing if not k.startswith(("backbone.", "box_refiner."))]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint '{path}' does not fit the model: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model_hash = file_hash(path)
    return model.to(device).eval(), model_hash


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

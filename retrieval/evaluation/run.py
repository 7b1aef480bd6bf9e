"""``python -m retrieval evaluate``: methods by name → harness → table + dumps."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .harness import evaluate, format_table

GLOBAL_POOLINGS = ("mac", "spoc", "gem", "rmac", "crow", "cgd")
METHODS = ("ours", "ours-untrained", "ours-dense", "ours-untrained-dense", *GLOBAL_POOLINGS,
           "sift-bow", "sift-vlad", "sift-exhaustive", "dasr")


def make_method(name: str, checkpoint: str = "default", device: str | torch.device = "cpu",
                index_dir: str | None = None):
    """A ``RetrievalMethod`` by name (see ``METHODS``)."""
    if name.startswith("ours"):
        from .ours import OursMethod

        ckpt = "none" if "untrained" in name else checkpoint
        return OursMethod(name, checkpoint=ckpt, dense=name.endswith("dense"), index_dir=index_dir, device=device)
    if name in GLOBAL_POOLINGS:
        from .global_baselines import GlobalDescriptorMethod

        return GlobalDescriptorMethod(name, device=str(device))
    if name.startswith("sift-"):
        from .sift_baseline import SiftMethod

        if name == "sift-exhaustive":
            method = SiftMethod("bow", rerank=10**9)
            method.name = name
            return method
        return SiftMethod(name.split("-", 1)[1])
    if name == "dasr":
        from .dasr_baseline import DasrMethod

        return DasrMethod(device=str(device))
    raise ValueError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")


def evaluate_methods(args) -> int:
    names = [n for item in args.method for n in item.split(",") if n]
    if "list" in names:
        print("\n".join(METHODS))
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    rows = []
    for name in names:
        method = make_method(name, args.checkpoint, device, args.index_dir)
        out = None
        if args.dump:
            out = Path(args.dump)
            if len(names) > 1 or out.suffix != ".json":
                out = out / f"{name}.json"
        print(f"== {name}", file=sys.stderr)
        _, metrics = evaluate(method, args.manifest, out_path=out, progress=True)
        rows.append(metrics)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0

"""Model speed: gallery encode (640 px), query encode, and one (query, image) match.

    python benchmarks/model_speed.py [--threads N] [--repeat 10]

Prints a table per device (CPU, and CUDA when available) and writes
benchmarks/results/model_speed.json.
"""
from __future__ import annotations

import argparse

import torch
from PIL import Image

from common import ROOT, environment, p50_p95, table, timed, write_json
from retrieval.checkpoint import load_model
from retrieval.images import load_image, resize_max_side, to_tensor
from retrieval.matching import encode_query, match_query


def measure(device: torch.device, repeat: int) -> list[dict]:
    model, model_hash = load_model("default", device=device)
    sync = device.type == "cuda"
    gallery_img, _ = resize_max_side(load_image(ROOT / "assets" / "demo" / "gallery" / "0001.jpg"), 640)
    batch1 = to_tensor(gallery_img).unsqueeze(0).to(device)
    batch8 = batch1.repeat(8, 1, 1, 1)
    rows = []
    with torch.no_grad():
        t = timed(lambda: model.encode_gallery(batch1), repeat, sync=sync)
        rows.append({"what": f"gallery encode {gallery_img.width}×{gallery_img.height}, batch 1", "ms": p50_p95(t)})
        t = timed(lambda: model.encode_gallery(batch8), max(2, repeat // 4), sync=sync)
        rows.append({"what": "gallery encode, per image in a batch of 8",
                     "ms": tuple(v / 8 for v in p50_p95(t))})
        maps = model.encode_gallery(batch1)
        sizes = torch.tensor([[gallery_img.height, gallery_img.width]], device=device)
        for side in (48, 96, 160):
            patch = gallery_img.crop((100, 100, 100 + side, 100 + side))
            t = timed(lambda: encode_query(model, patch, device=device), repeat, sync=sync)
            query = encode_query(model, patch, device=device)
            rows.append({"what": f"query encode {side}×{side}, scales {query.scales}", "ms": p50_p95(t)})
            t = timed(lambda: match_query(model, query, maps, sizes), repeat, sync=sync)
            rows.append({"what": f"match one image (query {side} px)", "ms": p50_p95(t)})
            maps32 = {l: m.repeat(32, 1, 1, 1) for l, m in maps.items()}
            sizes32 = sizes.repeat(32, 1)
            t = timed(lambda: match_query(model, query, maps32, sizes32), max(2, repeat // 4), sync=sync)
            rows.append({"what": f"match, per image in a batch of 32 (query {side} px)",
                         "ms": tuple(v / 32 for v in p50_p95(t))})
    for r in rows:
        r["p50_ms"], r["p95_ms"] = r.pop("ms")
        r["model"] = model_hash
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    report = {}
    for device in devices:
        env = environment(device)
        rows = measure(device, args.repeat)
        print(f"\n## {env['device']} — {env['cpu']}, {env['threads']} threads" + (f", {env['gpu']}" if 'gpu' in env else ""))
        print(table(rows, [("what", "{}"), ("p50_ms", "{:.1f}"), ("p95_ms", "{:.1f}")]))
        report[device.type] = {"environment": env, "rows": rows}
    print(f"\nwrote {write_json('model_speed', report)}")


if __name__ == "__main__":
    main()

"""Time from ``python app.py`` to the page answering, and search latency through the API.

    python benchmarks/app_startup.py [--repeats 3] [--device auto]

Starts the app as a user would (a subprocess on a free port, warm-up on, a temporary
data dir), measures start → the page answers HTTP 200 (target ≤ 20 s on a CPU) and
start → the demo gallery is searchable, then, through ``gradio_client`` on the demo
gallery: the first search, per-search latency of the one-click example queries
(default settings: rerank 100, all scales), 4 searches at once from 4 clients, and
``/galleries``. Prints a table and writes benchmarks/results/app_startup.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import ROOT, environment, p50_p95, table, write_json

sys.path.insert(0, str(ROOT / "tests"))
from app_server import AppServer  # noqa: E402

TARGET_STARTUP_S = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="searches per example query")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    from app import EXAMPLES

    work = Path(tempfile.mkdtemp(prefix="app-startup-"))
    server = AppServer(work / "galleries", work / "app.log", extra_args=("--device", args.device))
    started = time.perf_counter()
    server.start(timeout=300)
    page_s = server.startup_seconds
    server.wait_for_demo()
    demo_s = time.perf_counter() - started
    try:
        client = Client(server.url, verbose=False, download_files=False)

        def search(c, example):
            _, path, box = example
            t = time.perf_counter()
            out = c.predict(handle_file(str(ROOT / path)), box, "demo", 10, 100, 5, "", 0, api_name="/search")
            return (time.perf_counter() - t) * 1e3, out

        first_ms, _ = search(client, EXAMPLES[0])
        latencies, engine_ms = [], []
        for _ in range(args.repeats):
            for example in EXAMPLES:
                ms, out = search(client, example)
                latencies.append(ms)
                engine_ms.append(out["timings_ms"]["total"])
        clients = [Client(server.url, verbose=False, download_files=False) for _ in range(4)]
        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda ce: search(*ce), zip(clients, EXAMPLES[:4])))
        concurrent_s = time.perf_counter() - t
        gal = []
        for _ in range(10):
            t = time.perf_counter()
            client.predict(api_name="/galleries")
            gal.append((time.perf_counter() - t) * 1e3)
    finally:
        server.stop()
    p50, p95 = p50_p95(latencies)
    e50, e95 = p50_p95(engine_ms)
    g50, _ = p50_p95(gal)
    rows = [
        {"measure": "start → page answers (s)", "value": page_s,
         "note": f"target ≤ {TARGET_STARTUP_S:.0f} s: {'met' if page_s <= TARGET_STARTUP_S else 'MISSED'}"},
        {"measure": "start → demo searchable (s)", "value": demo_s, "note": "bundled index, or rebuilt at start"},
        {"measure": "first search (ms)", "value": first_ms, "note": "right after start-up, warm-up may still run"},
        {"measure": "search p50 (ms)", "value": p50, "note": f"API round trip, {len(latencies)} searches"},
        {"measure": "search p95 (ms)", "value": p95, "note": ""},
        {"measure": "engine time p50 / p95 (ms)", "value": e50, "note": f"inside the app; p95 {e95:.0f} ms"},
        {"measure": "4 searches at once, wall (s)", "value": concurrent_s, "note": "4 clients, concurrency limit 4"},
        {"measure": "/galleries p50 (ms)", "value": g50, "note": ""},
    ]
    print(table(rows, [("measure", "{}"), ("value", "{:.1f}"), ("note", "{}")]))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    path = write_json("app_startup", {
        "environment": environment(device), "examples": [e[0] for e in EXAMPLES], "repeats": args.repeats,
        "startup_page_s": page_s, "startup_demo_ready_s": demo_s, "first_search_ms": first_ms,
        "search_ms": {"p50": p50, "p95": p95, "all": latencies},
        "engine_ms": {"p50": e50, "p95": e95}, "concurrent_4_wall_s": concurrent_s, "galleries_p50_ms": g50,
        "target_startup_s": TARGET_STARTUP_S})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The command line: exit codes, messages, --json."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import DEMO, ROOT


def run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "retrieval", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("g")
    for src in sorted((DEMO / "gallery").glob("*.jpg"))[:4]:
        shutil.copy(src, folder / src.name)
    root = tmp_path_factory.mktemp("i") / "demo"
    out = run("index", str(folder), "--index", str(root), "--checkpoint", "none")
    assert out.returncode == 0, out.stderr
    assert "4 images (4 encoded" in out.stdout
    return root


def test_search_json_and_info(index):
    out = run("search", "--index", str(index), "--query", str(DEMO / "queries" / "scenes" / "rocket_1.jpg"),
              "--box", "10,10,200,200", "--top", "3", "--json", "--checkpoint", "none")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert len(results) == 3 and set(results[0]) == {"path", "score", "box"}
    assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]
    info = run("info", "--index", str(index))
    assert info.returncode == 0 and "images       4" in info.stdout and "exact" in info.stdout


def test_clear_errors(index, tmp_path):
    q = str(DEMO / "queries" / "rocket.jpg")
    missing = run("search", "--index", str(tmp_path / "nope"), "--query", q, "--checkpoint", "none")
    assert missing.returncode == 4 and "no index" in missing.stderr and "Traceback" not in missing.stderr
    bad_box = run("search", "--index", str(index), "--query", q, "--box", "5,5,1", "--checkpoint", "none")
    assert bad_box.returncode == 2 and "box" in bad_box.stderr and "Traceback" not in bad_box.stderr
    (tmp_path / "q.jpg").write_text("nonsense")
    unreadable = run("search", "--index", str(index), "--query", str(tmp_path / "q.jpg"), "--checkpoint", "none")
    assert unreadable.returncode == 3 and "not a readable image" in unreadable.stderr
    mismatch = run("search", "--index", str(index), "--query", q, "--checkpoint", str(tmp_path / "x.pt"))
    assert mismatch.returncode == 4 and "not found" in mismatch.stderr

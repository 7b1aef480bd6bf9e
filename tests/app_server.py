"""Start ``python app.py`` on a free local port for the app tests, and stop it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """The app in a subprocess with its own data dir; ``url`` answers once :meth:`start` returns."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: tuple[str, ...] = ("--no-warmup",)) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = float("nan")

    def start(self, timeout: float = 120.0) -> "AppServer":
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.pop("RETRIEVAL_DATA_DIR", None)
        self._log = open(self.log_path, "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(self.port),
                                      "--data-dir", str(self.data_dir), *self.extra_args],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        self.startup_seconds = time.perf_counter() - started
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"app.py did not answer within {timeout} s:\n{self.log()}")

    def wait_for_demo(self, timeout: float = 400.0) -> None:
        """Wait until the demo gallery is searchable; it is rebuilt at start-up when the bundled
        index was made with another model (then this takes minutes on a CPU)."""
        from gradio_client import Client

        client = Client(self.url, verbose=False, download_files=False)
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            demo = next(g for g in client.predict(api_name="/galleries") if g["name"] == "demo")
            if demo["ready"]:
                return
            time.sleep(2)
        raise RuntimeError(f"the demo gallery was not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

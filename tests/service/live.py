"""A real `d2lora serve` in a subprocess (vLLM engine), which tests can stop, kill and start again.

It keeps its data dir across restarts, so what was uploaded before a restart
must serve after it.  Its log goes to a file, shown when it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 420
STOP_TIMEOUT_S = 60
API_KEY = "test-inference-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, base_dir: Path, data_dir: Path, log_dir: Path, **env: str):
        self.base_dir, self.data_dir, self.log_dir = base_dir, data_dir, log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1",
            "D2LORA_API_KEYS": API_KEY,
            **env,
        }
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def base_name(self) -> str:
        return self.base_dir.resolve().name

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin_token").read_text().strip()

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"server-{self.starts}.log", "wb")
        command = [
            sys.executable,
            "-m",
            "merger.cli",
            "serve",
            "--base",
            str(self.base_dir),
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--engine",
            "vllm",
        ]
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = (self.log_dir / f"server-{self.starts}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (uvicorn's graceful shutdown), SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown code runs (its vLLM engine-core child is killed too)."""
        if self.process is None or self.process.poll() is not None:
            return
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)
        for pid in children.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

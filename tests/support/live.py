"""A real `d2lora serve` in a subprocess, on either engine, which tests can stop, kill and start again.

It keeps its data dir across restarts, so what was uploaded before a restart must serve after it.
Its log goes to one file per start, shown when it fails to start.  Metrics are read from /metrics the
way Prometheus would.  The one launcher for the tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

START_TIMEOUT_S = 420
STOP_TIMEOUT_S = 60
API_KEY = "test-inference-key"
INFERENCE_HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports.  Each is held until all are chosen: ports chosen one after another
    can repeat (1 in ~20,000 pairs here), and a process binding twice with SO_REUSEPORT (HAProxy does)
    silently shares one port between its two listeners."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class LiveServer:
    """`d2lora serve --base base_dir --data-dir data_dir --engine engine`, `env` as extra environment."""

    def __init__(self, base_dir: Path, data_dir: Path, log_dir: Path, engine: str = "vllm", **env: str):
        self.base_dir, self.data_dir, self.log_dir, self.engine = base_dir, data_dir, log_dir, engine
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
        """The one it was given (D2LORA_ADMIN_TOKEN), else the one it created in its data dir."""
        given = self.env.get("D2LORA_ADMIN_TOKEN")
        return given or (self.data_dir / "admin_token").read_text().strip()

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "service.cli", "serve", "--base", str(self.base_dir), "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--engine", self.engine]  # fmt: skip

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"server-{self.starts}.log"

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def logs(self) -> str:
        """Every start's log, in order."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("server-*.log")))

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

    # what the tests ask of it

    def complete(self, model: str, prompt: str, max_tokens: int, timeout: float = 120, **extra) -> httpx.Response:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        return httpx.post(f"{self.url}/v1/completions", json=body, headers=INFERENCE_HEADERS, timeout=timeout)

    def answer(self, model: str, prompt: str, max_tokens: int) -> str:
        response = self.complete(model, prompt, max_tokens)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    def gauge(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
        return float(line.split()[1])

    def wait_idle(self, timeout_s: float = 30) -> tuple[float, float]:
        """(running, waiting) once both are 0, or as they are when the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            counts = self.gauge("d2lora_requests_running"), self.gauge("d2lora_requests_waiting")
            if counts == (0, 0) or time.monotonic() > deadline:
                return counts
            time.sleep(0.2)

    def tmp_entries(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "tmp").iterdir())


ADMIN_TOKEN = "live-admin-token"


@contextlib.contextmanager
def serve(base_dir: Path, data_dir: Path, engine: str = "vllm", **settings: str) -> Iterator[str]:
    """`d2lora serve` on a free port, `settings` as D2LORA_* variables, inference open; yields its URL once ready."""
    with serve_process(base_dir, data_dir, data_dir.parent, engine, **settings) as server:
        yield server.url


@contextlib.contextmanager
def serve_process(
    base_dir: Path, data_dir: Path, log_dir: Path, engine: str = "vllm", **settings: str
) -> Iterator[LiveServer]:
    """As `serve`, logging into `log_dir`; yields the LiveServer (which a test may kill)."""
    env = {f"D2LORA_{name.upper()}": value for name, value in settings.items()}
    log_dir.mkdir(parents=True, exist_ok=True)
    server = LiveServer(base_dir, data_dir, log_dir, engine, D2LORA_ADMIN_TOKEN=ADMIN_TOKEN, D2LORA_API_KEYS="",
                        **env)  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()

"""A live `d2lora serve` subprocess for the hardening tests, on either engine, and what they ask of it.

The transformers engine on a tiny model starts in seconds, so most fault tests
use it; vLLM only where the fault is vLLM's own.  Metrics are read from
/metrics the way Prometheus would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.service.live import API_KEY, LiveServer

INFERENCE_HEADERS = {"Authorization": f"Bearer {API_KEY}"}


class Server(LiveServer):
    def __init__(self, base_dir: Path, data_dir: Path, log_dir: Path, engine: str = "transformers", **env: str):
        super().__init__(base_dir, data_dir, log_dir, **env)
        self.engine = engine

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
            self.engine,
        ]
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("server-*.log")))

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

"""A real `d2lora serve` and a real Prometheus scraping it, as subprocesses on loopback ports.

Both are bounded: each start waits at most START_TIMEOUT_S, and both are
terminated (then killed) when the test module is done.  Prometheus runs
docker/prometheus.yml with the compose service discovery swapped for the live
server's address, so the shipped job (path, labels) is what gets exercised.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from tests.deploy.stack import PROMETHEUS_CONFIG, REPO
from tests.support.live import LiveServer, free_port

START_TIMEOUT_S = 240
SCRAPE_INTERVAL = "1s"
ADMIN_TOKEN = "live-admin-token"


def wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running(
    command: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        wait_until_ready(ready_url, process, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def scrape_config(targets: dict[str, str]) -> dict:
    """docker/prometheus.yml, scraping every second; each job scrapes targets[job] (host:port), not compose's DNS."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


@contextlib.contextmanager
def prometheus(binary: Path, targets: dict[str, str], work_dir: Path) -> Iterator[str]:
    """A Prometheus scraping `targets` (job -> host:port; its own job added); yields its base URL once ready."""
    port = free_port()
    config_file = work_dir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(scrape_config(targets | {"prometheus": f"127.0.0.1:{port}"})))
    command = [
        str(binary),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={work_dir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(command, f"http://127.0.0.1:{port}/-/ready", work_dir / "prometheus.log"):
        yield f"http://127.0.0.1:{port}"


def wait_for_scrapes(prometheus_url: str, job: str, count: int = 2, timeout_s: float = 30) -> None:
    """Block until Prometheus has scraped `job` `count` more times (its `up` sample count grows)."""
    query = f'count_over_time(up{{job="{job}"}}[10m])'

    def scrapes() -> int:
        result = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": query}, timeout=5).json()
        return int(float(result["data"]["result"][0]["value"][1])) if result["data"]["result"] else 0

    start, deadline = scrapes(), time.monotonic() + timeout_s
    while scrapes() < start + count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus did not scrape {job} {count} times in {timeout_s} s")
        time.sleep(0.25)

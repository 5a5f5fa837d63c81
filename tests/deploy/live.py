"""A real `d2lora serve` and a real Prometheus scraping it, as subprocesses on loopback ports.

Both are bounded: each start waits at most START_TIMEOUT_S, and both are
terminated (then killed) when the test module is done.  Prometheus runs
docker/prometheus.yml with the compose service discovery swapped for the live
server's address, so the shipped job (path, labels) is what gets exercised.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from tests.deploy.stack import PROMETHEUS_CONFIG
from tests.support.live import free_port
from tests.support.processes import running

SCRAPE_INTERVAL = "1s"


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

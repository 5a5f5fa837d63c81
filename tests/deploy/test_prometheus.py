"""docker/prometheus.yml: promtool accepts it, and it scrapes the port and path the service serves."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy.stack import ENV_EXAMPLE, PROMETHEUS_CONFIG, SERVICE_NAMES, load_compose, read_env_file
from tests.support.tools import require_tool

METRICS_PATH = "/metrics"  # SPEC §4: GET /metrics


@pytest.fixture(scope="module")
def scrape_job() -> dict:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "d2lora"]
    return job


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(read_env_file(ENV_EXAMPLE) | {"D2LORA_ADMIN_TOKEN": "t", "GRAFANA_ADMIN_PASSWORD": "p"})


def test_promtool_accepts_the_config():
    promtool = require_tool("promtool")
    done = subprocess.run([str(promtool), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rejects_a_broken_config(tmp_path):
    promtool = require_tool("promtool")
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: often"))
    assert subprocess.run([str(promtool), "check", "config", str(broken)], capture_output=True).returncode != 0


def test_scrapes_the_metrics_path_of_the_service(scrape_job):
    assert scrape_job.get("metrics_path", METRICS_PATH) == METRICS_PATH


def test_finds_every_api_replica_by_its_network_alias_and_port(scrape_job, compose):
    (discovery,) = scrape_job["dns_sd_configs"]
    for name in SERVICE_NAMES:
        service = compose["services"][name]
        assert set(discovery["names"]) <= set(service["networks"]["default"]["aliases"]), name
        assert [int(p) for p in service["expose"]] == [discovery["port"]], name


def test_compose_mounts_this_config_where_prometheus_reads_it(compose):
    prometheus = compose["services"]["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    assert mounted[config_flag.split("=", 1)[1]] == "./docker/prometheus.yml"

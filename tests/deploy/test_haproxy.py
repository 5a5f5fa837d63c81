"""docker/haproxy.cfg: HAProxy accepts it, and it routes to the ports and names compose and Prometheus use.

Routing itself (affinity, bounded load, a killed replica) is tests/deploy/test_replicas.py's,
against real replicas; here a real HAProxy checks the shipped file and serves its exporter.
"""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.promql import HAPROXY_METRICS
from tests.deploy.stack import ENV_EXAMPLE, PROMETHEUS_CONFIG, SERVICE_NAMES, load_compose, read_env_file
from tests.support import replicas as rp
from tests.support.live import free_port
from tests.support.tools import require_tool

CONFIG_IN_IMAGE = "/usr/local/etc/haproxy/haproxy.cfg"  # where the haproxy image reads its config
ONE_MIB = 1 << 20


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(read_env_file(ENV_EXAMPLE) | {"D2LORA_ADMIN_TOKEN": "t", "GRAFANA_ADMIN_PASSWORD": "p"})


@pytest.fixture(scope="module")
def config_text() -> str:
    return rp.HAPROXY_CONFIG.read_text()


def test_haproxy_accepts_the_config():
    haproxy = require_tool("haproxy")
    done = subprocess.run([str(haproxy), "-c", "-f", str(rp.HAPROXY_CONFIG)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_haproxy_rejects_a_broken_config(tmp_path):
    haproxy = require_tool("haproxy")
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(rp.HAPROXY_CONFIG.read_text().replace("hash-type consistent", "hash-type sideways"))
    assert subprocess.run([str(haproxy), "-c", "-f", str(broken)], capture_output=True).returncode != 0


def test_routes_by_the_json_model_with_bounded_consistent_hashing(config_text):
    assert "option http-buffer-request" in config_text
    assert re.search(r"^\s*balance hash req\.body,json_query\('\$\.model'\)$", config_text, re.MULTILINE)
    assert re.search(r"^\s*hash-type consistent \w+ avalanche\b", config_text, re.MULTILINE)
    assert re.search(r"^\s*hash-balance-factor \d+", config_text, re.MULTILINE)


def test_buffers_hold_a_megabyte_body(config_text):
    (size,) = re.findall(r"^\s*tune\.bufsize (\d+)", config_text, re.MULTILINE)
    assert int(size) >= ONE_MIB


def test_health_checks_ask_ready(config_text):
    assert re.search(r"^\s*option httpchk GET /ready$", config_text, re.MULTILINE)
    assert re.search(r"^\s*default-server check\b", config_text, re.MULTILINE)


def test_servers_are_the_replicas_by_their_alias_and_exposed_port(config_text, compose):
    (target,) = re.findall(r"^\s*server-template \S+ \S+ (\S+)", config_text, re.MULTILINE)
    host, port = target.split(":")
    for name in SERVICE_NAMES:
        service = compose["services"][name]
        assert host in service["networks"]["default"]["aliases"], name
        assert [int(p) for p in service["expose"]] == [int(port)], name


def test_compose_publishes_the_api_port_and_mounts_this_config(config_text, compose):
    haproxy = compose["services"]["haproxy"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in haproxy["volumes"]}
    assert mounts[CONFIG_IN_IMAGE] == "./docker/haproxy.cfg"
    (frontend_port,) = re.findall(r"^frontend api\n\s*bind :(\d+)", config_text, re.MULTILINE)
    assert [str(p).rsplit(":", 1)[-1] for p in haproxy["ports"]] == [frontend_port]


def test_prometheus_scrapes_the_exporter_port(config_text, compose):
    (metrics_port,) = re.findall(r"^frontend metrics\n\s*bind :(\d+)", config_text, re.MULTILINE)
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    (static,) = jobs["haproxy"]["static_configs"]
    assert static["targets"] == [f"haproxy:{metrics_port}"]
    assert compose["services"]["haproxy"]["expose"] == [metrics_port]


def test_the_exporter_serves_every_haproxy_metric_the_dashboard_reads(tmp_path):
    binary = require_tool("haproxy")
    with rp.haproxy(binary, [f"127.0.0.1:{free_port()}"], tmp_path, wait_up=False) as (proxy, _):  # a server down
        families = text_string_to_metric_families(httpx.get(proxy.metrics_url, timeout=5).text)
        exposed = {family.name + ("_total" if family.type == "counter" else ""): family.type for family in families}
    assert {name: exposed.get(name) for name in HAPROXY_METRICS} == HAPROXY_METRICS

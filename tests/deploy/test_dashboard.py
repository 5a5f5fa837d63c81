"""The Grafana dashboard: valid PromQL over SPEC §5 metrics only, wired to the provisioned data source."""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import pytest
import yaml

from tests.deploy.promql import (
    HAPROXY_METRICS,
    SPEC_METRICS,
    metric_names,
    series_names,
    to_promql,
)
from tests.deploy.stack import (
    DASHBOARD,
    ENV_EXAMPLE,
    GRAFANA_PROVISIONING,
    dashboard_expressions,
    dashboard_panels,
    load_compose,
    load_dashboard,
    read_env_file,
)
from tests.support.tools import require_tool


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(read_env_file(ENV_EXAMPLE) | {"D2LORA_ADMIN_TOKEN": "t", "GRAFANA_ADMIN_PASSWORD": "p"})


def _provisioned(kind: str) -> dict:
    (path,) = (GRAFANA_PROVISIONING / kind).glob("*.yml")
    return yaml.safe_load(path.read_text())


def service_metrics() -> dict[str, str]:
    """name -> type of every metric service/metrics.py registers (counters as exposed, with _total)."""
    from service.metrics import REGISTRY

    return {family.name + ("_total" if family.type == "counter" else ""): family.type for family in REGISTRY.collect()}


def test_the_service_registers_exactly_the_spec_metrics_and_its_listed_extras():
    assert service_metrics() == SPEC_METRICS


def test_every_expression_names_only_spec_or_haproxy_metrics(dashboard):
    allowed = series_names(SPEC_METRICS | HAPROXY_METRICS)
    for expr in dashboard_expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= allowed, f"{expr!r} names {sorted(names - allowed)}, neither SPEC §5 nor HAProxy's exporter"


def test_every_spec_and_haproxy_metric_is_on_the_dashboard(dashboard):
    shown = {name for expr in dashboard_expressions(dashboard) for name in metric_names(expr)}
    for metric, kind in (SPEC_METRICS | HAPROXY_METRICS).items():
        assert series_names({metric: kind}) & shown, f"{metric} is on no panel"


def test_endpoint_selectors_match_routes_of_the_service(dashboard):
    from service.app import create_app
    from service.settings import Settings

    paths = [route.path for route in create_app(Settings()).routes]
    for expr in dashboard_expressions(dashboard):
        for pattern in re.findall(r'endpoint=~"([^"]+)"', expr):
            assert [p for p in paths if re.fullmatch(pattern, p)], f"endpoint=~{pattern!r} matches no route of {paths}"


def test_every_expression_is_valid_promql(dashboard, tmp_path):
    promtool = require_tool("promtool")
    exprs = dashboard_expressions(dashboard)
    rules = [{"record": f"dashboard:expr_{i}", "expr": to_promql(expr)} for i, expr in enumerate(exprs)]
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([str(promtool), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_panels_have_unique_ids_and_fit_the_grid(dashboard):
    panels = dashboard_panels(dashboard)
    assert not [pid for pid, n in Counter(p["id"] for p in panels).items() if n > 1]
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)


def test_every_query_uses_the_provisioned_prometheus(dashboard):
    (source,) = _provisioned("datasources")["datasources"]
    refs = [p["datasource"] for p in dashboard_panels(dashboard) if "datasource" in p]
    refs += [t["datasource"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert refs and all(ref == {"type": source["type"], "uid": source["uid"]} for ref in refs)


def test_provisioned_data_source_points_at_the_compose_prometheus(compose):
    (source,) = _provisioned("datasources")["datasources"]
    host, port = source["url"].removeprefix("http://").split(":")
    published = compose["services"][host]["ports"]
    assert [str(p).rsplit(":", 1)[-1] for p in published] == [port]


def test_compose_mounts_the_dashboard_where_the_provider_loads_it(compose):
    (provider,) = _provisioned("dashboards")["providers"]
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"

"""The metric names a Grafana PromQL expression reads, and the plain PromQL Prometheus would get.

Grafana sends `$model`, `$__rate_interval` and `$__range` substituted, and its
`label_values(metric, label)` variable query is not PromQL at all; `to_promql`
does the same substitutions so promtool and a live Prometheus can run them.
"""

from __future__ import annotations

import re

# SPEC §5, as the contract writes it: name -> type.
SPEC_METRICS = {
    "d2lora_requests_total": "counter",
    "d2lora_request_latency_seconds": "histogram",
    "d2lora_time_to_first_token_seconds": "histogram",
    "d2lora_time_per_output_token_seconds": "histogram",
    "d2lora_prompt_tokens_total": "counter",
    "d2lora_generation_tokens_total": "counter",
    "d2lora_requests_running": "gauge",
    "d2lora_requests_waiting": "gauge",
    "d2lora_swap_seconds": "histogram",
    "d2lora_merge_seconds": "histogram",
    "d2lora_merges_total": "counter",
    "d2lora_equivalence_max_abs_logit_diff": "gauge",
    "d2lora_resident_models": "gauge",
    "d2lora_forwards_total": "counter",
    "d2lora_adapters_per_forward": "histogram",
    "vllm:num_requests_waiting": "gauge",  # vLLM's names, for inference gateways (SPEC §5, last paragraph)
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:lora_requests_info": "gauge",
}
# HAProxy's own exporter (docker/haproxy.cfg), the names the dashboard reads; tests/deploy/test_haproxy.py
# checks a real HAProxy 2.6 serves each of them.
HAPROXY_METRICS = {
    "haproxy_server_status": "gauge",
    "haproxy_server_current_sessions": "gauge",
    "haproxy_server_http_responses_total": "counter",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")

_LABEL_VALUES = re.compile(r"^label_values\(\s*(?P<metric>[^,]+?)\s*,\s*(?P<label>\w+)\s*\)$")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def series_names(metrics: dict[str, str]) -> set[str]:
    """Every series name a set of metrics exposes: a histogram's _bucket/_sum/_count too."""
    names = set(metrics)
    for name, kind in metrics.items():
        if kind == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SERIES)
    return names


def to_promql(expr: str, model_regex: str = ".*") -> str:
    """The expression as Prometheus receives it from Grafana, with every variable replaced."""
    label_values = _LABEL_VALUES.match(expr.strip())
    if label_values:
        return f"group by ({label_values['label']}) ({label_values['metric']})"
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr.replace("$model", model_regex)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and numbers excluded)."""
    text = to_promql(expr)
    for pattern in (_STRING, _BRACES, _RANGE, _GROUPING):
        text = pattern.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}

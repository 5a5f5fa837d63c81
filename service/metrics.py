"""Every Prometheus metric of the service, in one table (SPEC §5).

The last four carry vLLM's names, for inference gateways (Gateway API Inference Extension,
llm-d) that route by them; they are set from the scheduler's state each time /metrics is read
(`record_gateway_state`), so they are as fresh as the scrape.

Import the objects from here; never create a metric anywhere else.  All live in
one CollectorRegistry so an app (or a test) exposes exactly these series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.scheduling.scheduler import SchedulerState

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
SWAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
MERGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "d2lora_requests",
    "Requests served, by model, endpoint and HTTP status.",
    ["model", "endpoint", "status"],
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "d2lora_request_latency_seconds",
    "End-to-end request latency.",
    ["model", "endpoint"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "d2lora_time_to_first_token_seconds",
    "Arrival to first generated token.",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "d2lora_time_per_output_token_seconds",
    "Decode time per token after the first.",
    ["model"],
    buckets=TOKEN_BUCKETS,
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter("d2lora_prompt_tokens", "Prompt tokens processed.", ["model"], registry=REGISTRY)
GENERATION_TOKENS = Counter("d2lora_generation_tokens", "Tokens generated.", ["model"], registry=REGISTRY)
REQUESTS_RUNNING = Gauge("d2lora_requests_running", "Requests admitted to an engine.", registry=REGISTRY)
REQUESTS_WAITING = Gauge("d2lora_requests_waiting", "Requests queued for their model's turn.", registry=REGISTRY)
SWAP_SECONDS = Histogram(
    "d2lora_swap_seconds",
    "Hot-swap latency: loading a model's weights into an engine.",
    ["model"],
    buckets=SWAP_BUCKETS,
    registry=REGISTRY,
)
MERGE_SECONDS = Histogram(
    "d2lora_merge_seconds",
    "Wall time of merge + verify of an uploaded adapter.",
    buckets=MERGE_BUCKETS,
    registry=REGISTRY,
)
MERGES = Counter("d2lora_merges", "Adapter merges by outcome (ok | failed).", ["status"], registry=REGISTRY)
EQUIVALENCE_MAX_ABS_LOGIT_DIFF = Gauge(
    "d2lora_equivalence_max_abs_logit_diff",
    "Max |logit| difference merged vs unmerged at upload.",
    ["model"],
    registry=REGISTRY,
)
FORWARDS = Counter(
    "d2lora_forwards",
    "Engine forward steps, by the mode of the engine that ran them (batched | merged).",
    ["mode"],
    registry=REGISTRY,
)
ADAPTERS_PER_FORWARD = Histogram(
    "d2lora_adapters_per_forward",
    "Distinct per-request adapters in one forward step (0: base or merged weights only).",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
RESIDENT_MODELS = Gauge(
    "d2lora_resident_models", "Models whose weights are loaded in an engine now.", registry=REGISTRY
)
NUM_REQUESTS_WAITING = Gauge("vllm:num_requests_waiting", "Requests queued for their model's turn.", registry=REGISTRY)
NUM_REQUESTS_RUNNING = Gauge("vllm:num_requests_running", "Requests admitted to an engine.", registry=REGISTRY)
KV_CACHE_USAGE_PERC = Gauge(
    "vllm:kv_cache_usage_perc",
    "Fraction of KV-cache blocks in use, the fullest engine's (0 for an engine without a paged cache).",
    registry=REGISTRY,
)
LORA_REQUESTS_INFO = Gauge(
    "vllm:lora_requests_info",
    "Adapters running (a resident merged model counts) and waiting, comma-separated; value: Unix time of the reading.",
    ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    registry=REGISTRY,
)


def record_gateway_state(state: SchedulerState) -> None:
    """Set the vLLM-named gauges from a SchedulerState; only the current adapter sets stay exported."""
    NUM_REQUESTS_WAITING.set(state.waiting)
    NUM_REQUESTS_RUNNING.set(state.running)
    KV_CACHE_USAGE_PERC.set(state.kv_cache_usage)
    LORA_REQUESTS_INFO.clear()
    LORA_REQUESTS_INFO.labels(
        max_lora=str(state.max_lora),
        running_lora_adapters=",".join(state.running_adapters),
        waiting_lora_adapters=",".join(state.waiting_adapters),
    ).set_to_current_time()

"""Every setting of the product, in one pydantic-settings class (env prefix D2LORA_).

Closed sets are `Literal`s and numbers carry their bounds, so a bad value fails when the settings
are read, before anything starts; `settings_error` turns pydantic's error into one line that names
the variable (or the command-line flag that set it).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from merger.demo import default_cache_dir
from merger.dtypes import ComputeDtype, OutputDtype
from merger.errors import D2LoraError
from service.engines import EngineName

ENV_PREFIX = "D2LORA_"
SchedulerMode = Literal["auto", "batched", "merged"]
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


class SettingsError(D2LoraError):
    """A setting holds a value outside its type or range."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    cache_dir: Path = Field(default_factory=default_cache_dir)  # the demo model and demo adapters live here

    # HTTP layer (service/app.py, routes/, registry.py, auth.py)
    base_dir: Path | None = None  # the served base checkpoint (`d2lora serve --base`)
    engine: EngineName = "vllm"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path.home() / ".local" / "share" / "d2lora"  # adapter records + fused tensors + admin token
    admin_token: SecretStr | None = None  # None: generated once, stored in data_dir/admin_token (mode 0600)
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()  # comma-separated; empty: inference is open
    max_upload_bytes: int = Field(default=2 << 30, gt=0)  # cap on one adapter upload, streamed to disk
    allow_base_mismatch: bool = False  # accept adapters whose base_model_name_or_path names another model
    merge_dtype: OutputDtype = "auto"  # dtype of the fused tensors; auto: the base's stored dtype

    # engines + scheduler (service/engines/, service/scheduling/)
    dtype: ComputeDtype = "float32"  # engine compute dtype (fp32 matches the merger bit-for-bit)
    kv_cache_gib: int = Field(default=2, gt=0)  # vLLM KV cache space (VLLM_CPU_KVCACHE_SPACE on CPU)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)  # vLLM on a GPU only
    tensor_parallel_size: int = Field(default=1, ge=1)  # GPUs one vLLM engine spans (vLLM's tensor_parallel_size)
    max_model_len: int | None = Field(default=None, gt=0)  # longest prompt + completion; None: the model's own
    max_num_seqs: int = Field(default=64, gt=0)  # sequences one engine decodes together
    max_resident: int = Field(default=1, gt=0)  # engines, each holding one model's weights (1 on CPU)
    max_waiting: int = Field(default=256, gt=0)  # queued over all models, beyond free engine places; then 429
    time_slice_s: float = Field(default=2.0, gt=0)  # how long a busy model keeps an engine while others wait
    scheduler_mode: SchedulerMode = "auto"  # batched | merged | auto (service/scheduling/policy.py)
    merged_after_s: float = Field(default=10.0, ge=0)  # auto: a model alone this long gets merged weights

    # per-request adapters on the vLLM engine (service/engines/lora/): vLLM's LoRA slots and its adapter cache
    max_loras: int = Field(default=16, ge=0)  # distinct adapters one forward pass mixes; 0: per-request adapters off
    max_cpu_loras: int | None = Field(default=None, ge=1)  # per-request forms kept loaded (LRU); None: 4 × max_loras
    max_lora_rank: int = 16  # largest rank k of a per-request form (2r for D²-LoRA); one of VLLM_LORA_RANKS

    @field_validator("max_lora_rank")
    @classmethod
    def _lora_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))} (the ranks vLLM allocates)")
        return value

    @field_validator("max_cpu_loras")
    @classmethod
    def _lora_cache(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_loras = info.data.get("max_loras", 0)  # validated first (declared first)
        if value is not None and value < max_loras:
            raise ValueError(f"must be >= max_loras ({max_loras}): every adapter in a batch is in the cache")
        return value

    @property
    def adapter_cache_size(self) -> int:
        """Per-request forms vLLM keeps loaded (max_cpu_loras, default 4 × max_loras)."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else 4 * self.max_loras

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value


def settings_error(err: ValidationError, flags: dict[str, str] | None = None) -> SettingsError:
    """The first problem as one line: `D2LORA_DTYPE='fp64': Input should be ...` (or `--engine 'x': ...`)."""
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    name = (flags or {}).get(field, f"{ENV_PREFIX}{field.upper()}")
    shown = "" if "secret" in field or "token" in field or "keys" in field else f"={first.get('input')!r}"
    return SettingsError(f"{name}{shown}: {first['msg']}")


def load_settings(overrides: dict[str, object] | None = None, flags: dict[str, str] | None = None) -> Settings:
    """Settings from the environment plus `overrides` (field -> value), a bad value as one SettingsError line.

    flags: field -> the command-line flag that gave its override, named in the error instead of the variable.
    """
    try:
        return Settings(**(overrides or {}))  # type: ignore[arg-type]  # pydantic validates every value
    except ValidationError as err:
        raise settings_error(err, flags) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()

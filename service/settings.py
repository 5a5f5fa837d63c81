"""Every setting of the product, in one pydantic-settings class (env prefix D2LORA_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="D2LORA_", extra="ignore")

    cache_dir: Path = Path.home() / ".cache" / "d2lora"  # the demo model and demo adapters live here


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

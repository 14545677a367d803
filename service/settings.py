"""The one settings object: defaults < MAGNUS_* environment variables < CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path.home() / ".cache" / "magnus"


class Settings(BaseSettings):
    """Every setting of `magnus serve`. Env: MAGNUS_<NAME>; CLI: --<name-with-dashes>."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_", extra="ignore")

    # server
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, description="bind port")
    log_level: str = Field("info", description="uvicorn/python log level")
    # model
    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a HF id, a local dir or a .gguf file")
    served_model_name: str | None = Field(None, description="model name in the API (default: derived from --model)")
    cache_dir: Path = Field(DATA_DIR / "models", description="where converted GGUF weights are cached")
    device: str = Field("auto", description="auto | cpu | cuda")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: float32 on CPU, bfloat16 on CUDA")
    quantize: Literal["none", "int8", "4bit"] = Field("none", description="weight quantization (VSQ uses int8 on CPU / 4bit on CUDA)")
    max_model_len: int | None = Field(None, description="context window (default: from the model config)")
    default_max_tokens: int = Field(512, description="max_tokens when a chat request gives none (capped by the context)")
    num_workers: int = Field(0, description="worker processes (0: one per CUDA device, else 1 on CPU)")
    worker_threads: int = Field(0, description="torch threads per CPU worker (0: torch default)")
    # scheduling
    policy: Literal["vs", "vsq", "ccb", "glp", "abp", "magnus"] = Field("vs", description="batching policy")
    batch_size: int = Field(8, description="fixed batch size (vs, vsq, glp) / sanity cap")
    max_wait: float = Field(0.05, description="seconds a partial batch may wait for companions (vs)")
    max_batch_size: int = Field(64, description="sanity cap on adaptive batch sizes (abp, magnus, ccb)")
    phi: float | None = Field(None, description="WMA threshold Phi (default: the scheduler's, see scheduler/wma.py)")
    kv_budget_bytes: int | None = Field(None, description="Theta: KV-cache bytes per worker (default: free CUDA memory less weights; 2 GiB on CPU)")
    mem_reserve_frac: float = Field(0.1, description="share of free CUDA memory kept back from Theta")
    embedder: str = Field("default", description="sentence embedder for the length predictor ('default': all-MiniLM-L6-v2, or sentence-transformers/LaBSE, or a path)")
    predictor_model: Path | None = Field(None, description="length-predictor forest file (default: <state-dir>/predictor.joblib)")
    predictor_interval_s: float = Field(180.0, description="continual learning period of the length predictor")
    estimator_interval_s: float = Field(120.0, description="continual learning period of the batch-time estimator")
    state_dir: Path = Field(DATA_DIR / "state", description="learners' persisted state")
    # request log
    db_path: Path = Field(DATA_DIR / "magnus.db", description="SQLite request/batch log")
    # fault injection
    mem_cap_bytes: int | None = Field(None, description="fault injection: KV-cache memory cap per worker")
    oom_every: int = Field(0, description="fault injection: every Nth multi-request batch runs out of memory")

    @field_validator("batch_size", "port")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting, with its default shown in --help."""
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = f"{field.description or ''} [env MAGNUS_{name.upper()}; default: {getattr(defaults, name)!s}]"
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_)


def from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)

"""The one settings object: defaults < MAGNUS_* environment variables < CLI flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from scheduler.pcb import MAX_RUNNING as PCB_MAX_RUNNING
from scheduler.pcb import MAX_RUNNING_CUDA as PCB_MAX_RUNNING_CUDA

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
    quantize: Literal["none", "int8", "4bit"] = Field("none", description="weight quantization: int8 (CPU: torch's dynamic int8; CUDA: bitsandbytes 8-bit) or 4bit (CUDA: bitsandbytes 4-bit); VSQ uses int8 on CPU / 4bit on CUDA")
    max_model_len: int | None = Field(None, description="context window (default: from the model config)")
    default_max_tokens: int = Field(512, description="max_tokens when a chat request gives none (capped by the context)")
    num_workers: int = Field(0, description="worker processes (0: one per CUDA device, else 1 on CPU)")
    workers: Literal["local", "ray"] = Field("local", description="worker backend: local processes, or Ray actors anywhere in a Ray cluster (pip install 'magnus-serve[ray]')")
    ray_address: str | None = Field(None, description="Ray cluster to join (host:port of `ray start --head`; default: 'auto', the local one)")
    ray_cpus_per_worker: float = Field(1.0, description="CPUs a Ray worker takes on a CPU cluster (on CUDA: one GPU each)")
    ray_max_workers: int = Field(0, description="most Ray workers (0: as many as the cluster's resources hold, growing as nodes join)")
    ray_scale_interval_s: float = Field(10.0, description="how often the cluster is checked for room for more Ray workers")
    worker_threads: int = Field(0, description="torch threads per CPU worker (0: torch default)")
    kv_headroom: int = Field(64, ge=0, description="spare KV-cache columns per layer that decode steps write in place (our runners); 0: transformers' cache, which copies the whole cache every step")
    # scheduling
    policy: Literal["vs", "vsq", "ccb", "pcb", "glp", "abp", "magnus"] = Field("pcb", description="batching policy (pcb: predictive continuous batching; magnus: the paper's static pipeline)")
    batch_size: int = Field(8, description="fixed batch size (vs, vsq, glp) / sanity cap")
    batch_exit: Literal["early", "literal"] = Field("early", description="static batches: early = a request returns, and its row leaves the batch, the step it ends; literal = the paper's static batch: every row runs and returns when the longest one ends")
    max_wait: float = Field(0.05, description="seconds a partial batch may wait for companions (vs)")
    max_batch_size: int | None = Field(None, ge=1, description="sanity cap on adaptive batch sizes (abp, magnus); most running requests per worker (ccb, pcb). Default: for pcb 32 on CPU (where every pcb measurement ran, bench/results/decode_cap_cpu.md) and 256 on CUDA (vLLM's max_num_seqs); 64 for the others")
    continuous_runner: Literal["auto", "transformers", "iteration"] = Field("auto", description="continuous policies' worker: transformers' continuous batching manager, or magnus' own iteration-level runner (per-request sampling, preemption); auto: ccb on transformers, pcb on its own")
    reserve: Literal["high", "point", "max"] = Field("high", description="pcb: generation tokens a running request reserves in memory: the predictor's high estimate, its point estimate, or max_tokens (as ccb)")
    swap_factor: float = Field(8.0, description="pcb: a running request is preempted for a waiting one whose predicted work is this many times smaller (0: never)")
    phi: float | None = Field(None, description="WMA threshold Phi (default: the scheduler's, see scheduler/wma.py)")
    kv_budget_bytes: int | None = Field(None, description="Theta: KV-cache bytes per worker (default: the free device memory less weights and --mem-reserve-frac: free CUDA memory, or on CPU the host's available memory shared by the workers)")
    mem_reserve_frac: float = Field(0.1, description="share of the free device (or host) memory kept back from Theta")
    embedder: str = Field("default", description="sentence embedder for the length predictor ('default': all-MiniLM-L6-v2, or sentence-transformers/LaBSE, or a path)")
    predictor_model: Path | None = Field(None, description="length-predictor model file (magnus predictor train; default: <state-dir>/predictor.joblib)")
    predictor_form: Literal["mixture", "paper", "probe"] = Field("mixture", description="form of the length model learned continually: 'mixture' (runaway classifier + ended-length regressor on sentence embeddings, calibrated high estimate), 'paper' (the paper's random forest) or 'probe' (the mixture on the served model's own hidden state of the prompt: the front end loads the model's first layers)")
    predictor_probe_layer: int | None = Field(None, ge=1, description="predictor form 'probe': decoder layers of the served model run per prompt (default: just past the middle); also the layer whose head states an iteration worker reports (default for the other forms: two thirds deep)")
    head_states: bool = Field(True, description="predictive policies on the iteration runner: the worker reports the mean hidden state of the probe layer at each re-prediction checkpoint, and the re-predictor learns runaways from them (no extra forward)")
    prediction_scale: float = Field(1.0, gt=0, description="fault injection: every length prediction (point and high) is multiplied by this before scheduling, to test wrong predictions (1 = off)")
    predictor_user_embedding: bool = Field(False, description="predictor form 'mixture' learned by the server: also read the user text's sentence embedding (off: only the application text's, cached, so a prediction embeds nothing new; the paper form always reads it)")
    predictor_interval_s: float = Field(180.0, description="continual learning period of the length predictor")
    predictor_max_defer_s: float = Field(1800.0, ge=0, description="the longest a due retrain of the length predictor waits for the workers to be idle (no request running or waiting); its fit, in a child process, is paused while they are busy until then (0: retrain whenever due)")
    estimator_interval_s: float = Field(120.0, description="continual learning period of the batch-time estimator")
    state_dir: Path = Field(DATA_DIR / "state", description="learners' persisted state")
    # request log
    db_path: Path = Field(DATA_DIR / "magnus.db", description="SQLite request/batch log")
    # fault injection
    mem_cap_bytes: int | None = Field(None, description="fault injection: KV-cache memory cap per worker")
    step_delay_s: float = Field(0.0, description="fault injection: sleep after every decode step (a slow device)")
    oom_every: int = Field(0, description="fault injection: every Nth multi-request batch runs out of memory")
    # production: auth, backpressure, limits, shutdown
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys (Authorization: Bearer KEY); none: no auth. Env: comma-separated or a JSON "
        "list; CLI: --api-key, repeatable or comma-separated")
    auth_health_metrics: bool = Field(False, description="whether /health and /metrics need an API key too")
    max_waiting_requests: int = Field(0, description="waiting requests past which new ones get 429 (0: no limit, as in vLLM; the Docker image sets 1024)")
    max_waiting_tokens: int = Field(0, description="waiting prompt+max_tokens past which new requests get 429 (0: no limit)")
    retry_after_s: float = Field(1.0, description="Retry-After sent with 429 and 503 answers")
    prediction_headers: bool = Field(True, description="completion responses carry x-magnus-predicted-tokens, x-magnus-predicted-tokens-high and x-magnus-queue-position headers (one value per choice, comma-separated)")
    max_request_bytes: int = Field(4 * 1024 * 1024, description="largest request body; larger ones get 413")
    request_timeout_s: float = Field(0.0, description="per-request deadline from arrival to the last token; past it 504 and the request is cancelled (0: none, as in vLLM; the Docker image sets 600)")
    shutdown_timeout_s: float = Field(30.0, description="on SIGTERM: how long waiting requests may still be served before they get 503; running batches always finish")

    def running_cap(self, device: str = "cpu") -> int:
        """``max_batch_size``, or when it is not set the policy's default on ``device``."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        if self.policy == "pcb":
            return PCB_MAX_RUNNING_CUDA if device.startswith("cuda") else PCB_MAX_RUNNING
        return 64

    @field_validator("batch_size", "port", "max_request_bytes")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("max_waiting_requests", "max_waiting_tokens", "retry_after_s", "request_timeout_s",
                     "shutdown_timeout_s")
    @classmethod
    def _not_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> list[str]:
        return split_list(v)


def split_list(v: Any) -> list[str]:
    """A list setting from a JSON list, a comma-separated string, or (from repeated flags) a list of those."""
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v)
    out: list[str] = []
    for item in items:
        text = str(item).strip()
        if text.startswith("["):  # JSON: items kept whole (a key may then contain a comma)
            parsed = json.loads(text)
            if not isinstance(parsed, list):
                raise ValueError("expected a JSON list")
            out.extend(str(x) for x in parsed if str(x))
        else:
            out.extend(x.strip() for x in text.split(",") if x.strip())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting, with its default shown in --help. List settings take a repeatable
    flag, also under its singular name (``--api-key A --api-key B`` or ``--api-keys A,B``)."""
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        flags = ["--" + name.replace("_", "-")]
        help_ = f"{field.description or ''} [env MAGNUS_{name.upper()}; default: {getattr(defaults, name)!s}]"
        if getattr(field.annotation, "__origin__", None) is list:
            flags.insert(0, flags[0].removesuffix("s"))
            parser.add_argument(*flags, dest=name, action="append", default=argparse.SUPPRESS, help=help_)
        else:
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=help_)


def from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)

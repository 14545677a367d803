"""Build the configured scheduling policy and its learners (length predictor, batch-time
estimator) for the served model, and run the learners' background retraining."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from scheduler.costmodel import CostModel, ModelProfile, get_hardware
from scheduler.estimator import BatchTimeEstimator
from scheduler.factory import make_policy
from scheduler.memory import MemoryModel
from scheduler.policy import Policy
from service.model import ModelInfo
from service.settings import Settings

log = logging.getLogger(__name__)


def hardware_for(device: str) -> str:
    """The built-in hardware profile closest to ``device``."""
    if not device.startswith("cuda"):
        return "cpu-local"
    import torch

    name = torch.cuda.get_device_name(torch.device(device if ":" in device else "cuda:0"))
    for key in ("H100", "A100", "V100"):
        if key in name:
            return f"{key}-{'32GB' if key == 'V100' else '80GB'}"
    return "A100-80GB"


def memory_model(settings: Settings, info: ModelInfo, profile: ModelProfile) -> MemoryModel:
    """Delta from the model config; Theta from free CUDA memory less the weights and a margin,
    or the configured budget on CPU (or when ``kv_budget_bytes`` is set)."""
    if settings.kv_budget_bytes is not None or not info.device.startswith("cuda"):
        theta = float(settings.kv_budget_bytes or 2 * 1024**3)
        return MemoryModel(delta=profile.delta, theta=theta)
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(info.device if ":" in info.device else "cuda:0"))
    return MemoryModel.for_device(profile.delta, free, profile.weight_bytes, reserve_frac=settings.mem_reserve_frac)


@dataclass
class Learners:
    """The policy plus whatever learns in the background for it."""

    policy: Policy
    predictor: Any = None  # predictor.LengthPredictor when the policy predicts lengths
    estimator: BatchTimeEstimator | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, interval_s: float) -> None:
        if self.predictor is not None:
            self.predictor.start_background()
        if self.estimator is not None:
            threading.Thread(target=self._estimator_loop, args=(interval_s,), daemon=True,
                             name="magnus-estimator").start()

    def _estimator_loop(self, interval_s: float) -> None:
        while not self._stop.wait(min(interval_s, 5.0)):
            try:
                if self.estimator.retrain_pending:
                    self.estimator.retrain()
            except Exception:  # noqa: BLE001 - keep serving on the previous model
                log.exception("estimator retraining failed")

    def stop(self) -> None:
        self._stop.set()
        if self.predictor is not None:
            self.predictor.stop()
        if self.estimator is not None:
            self.estimator.save()


def build(settings: Settings, info: ModelInfo) -> Learners:
    """The policy named by ``settings.policy`` with its learners wired to ``info``."""
    profile = ModelProfile.from_config(info.config, dtype_bytes=info.dtype_bytes, name=info.name)
    cost = CostModel(profile, get_hardware(hardware_for(info.device)))
    memory = memory_model(settings, info, profile)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    estimator = None
    if settings.policy == "magnus":
        estimator = BatchTimeEstimator(
            cost, interval_s=settings.estimator_interval_s, path=settings.state_dir / "estimator.json",
            sync_retrain=False,
        )
    params: dict[str, Any] = {
        "batch_size": settings.batch_size, "max_wait": settings.max_wait, "phi": settings.phi,
        "memory": memory, "max_batch_size": settings.max_batch_size, "estimator": estimator,
    }
    if settings.policy == "ccb":
        params["max_running"] = settings.max_batch_size
    policy = make_policy(settings.policy, **params)
    learners = Learners(policy=policy, estimator=estimator)
    if policy.needs_prediction:
        learners.predictor = _predictor(settings)
    log.info("policy %s: Delta=%.0f B/token, Theta=%.2f GiB", policy.name, memory.delta, memory.theta / 1024**3)
    return learners


def _predictor(settings: Settings):
    from predictor.predictor import LengthPredictor, PredictorConfig

    cfg = PredictorConfig(
        embedder=settings.embedder,
        model_path=str(settings.predictor_model or settings.state_dir / "predictor.joblib"),
        train_set_path=str(settings.state_dir / "predictor_trainset.npz"),
        retrain_interval_s=settings.predictor_interval_s,
        embed_threads=1,  # the embedder shares the CPU with the workers; one thread is faster there
    )
    return LengthPredictor(cfg)


def _item(sub: Any):
    from predictor.predictor import PredictInput

    return PredictInput(app_text=sub.app_text, user_text=sub.user_text, input_tokens=sub.input_tokens,
                        max_tokens=sub.max_tokens)


def predict(learners: Learners, sub: Any) -> tuple[int, int, str]:
    """Blocking (run it in a thread): (G'(p), high quantile, source) for a submission."""
    p = learners.predictor.predict([_item(sub)])[0]
    return p.tokens, p.high, p.source


def observe(learners: Learners, sub: Any, true_tokens: int) -> None:
    """Blocking (run it in a thread): a finished request teaches the predictor."""
    from predictor.predictor import Prediction

    pred = None
    if sub.predicted_tokens is not None:
        pred = Prediction(tokens=sub.predicted_tokens, high=sub.predicted_high or sub.predicted_tokens,
                          source=sub.predicted_source or "forest")
    learners.predictor.observe(_item(sub), true_tokens, pred)

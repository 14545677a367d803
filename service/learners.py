"""The server's scheduler and learners: the shared builder (``scheduler.builder``) given this
machine's device memory, plus the length predictor and the background retraining threads."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from predictor.types import PredictInput, Prediction
from scheduler.builder import PolicySettings, Scheduler, build_scheduler, served_profile
from scheduler.costmodel import ModelProfile, get_hardware
from scheduler.factory import policy_class
from scheduler.memory import MemoryModel
from scheduler.request import Request
from service.model import ModelInfo, state_layer, worker_mode
from service.settings import Settings
from worker.loader import device_kind

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


def memory_model(settings: Settings, info: ModelInfo, profile: ModelProfile, workers: int = 1) -> MemoryModel:
    """Delta from the model config; Theta = ``kv_budget_bytes`` when set, else the free memory
    of the device less the weights and a margin (``mem_reserve_frac``): free CUDA memory, or on
    CPU the host's available memory shared by the ``workers`` processes, so that the scheduler
    splits a batch before the kernel's out-of-memory killer would act."""
    if settings.kv_budget_bytes is not None:
        return MemoryModel(delta=profile.delta, theta=float(settings.kv_budget_bytes))
    if info.device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(info.device if ":" in info.device else "cuda:0"))
    else:
        import psutil

        free = psutil.virtual_memory().available / workers
    return MemoryModel.for_device(profile.delta, free, profile.weight_bytes, reserve_frac=settings.mem_reserve_frac)


def policy_settings(settings: Settings, device: str = "cpu") -> PolicySettings:
    return PolicySettings(
        name=settings.policy, batch_size=settings.batch_size, max_wait=settings.max_wait, phi=settings.phi,
        max_batch_size=settings.running_cap(device), estimator_interval_s=settings.estimator_interval_s,
        reserve=settings.reserve, swap_factor=settings.swap_factor,
    )


@dataclass
class Learners:
    """The built scheduler plus whatever learns in the background for it."""

    scheduler: Scheduler
    settings: Settings | None = None
    profile: ModelProfile | None = None  # the served model's Delta and weight bytes
    predictor: Any = None  # predictor.LengthPredictor when the policy predicts lengths
    batcher: Any = None  # service.predictbatch.PredictionBatcher, made at the first prediction
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def policy(self):
        return self.scheduler.policy

    @property
    def estimator(self):
        return self.scheduler.estimator

    def start(self, interval_s: float) -> None:
        if self.predictor is not None:
            self.predictor.start_background()
        if self.estimator is not None:
            threading.Thread(target=self._estimator_loop, args=(interval_s,), daemon=True,
                             name="magnus-estimator").start()

    def _estimator_loop(self, interval_s: float) -> None:
        while not self._stop.wait(min(interval_s, 5.0)):
            try:
                for est in self.estimator.all():  # one per worker kind
                    if est.retrain_pending:
                        est.retrain()
            except Exception:  # noqa: BLE001 - keep serving on the previous model
                log.exception("estimator retraining failed")

    def stop(self) -> None:
        self._stop.set()
        if self.predictor is not None:
            self.predictor.stop()
        if self.estimator is not None:
            for est in self.estimator.all():
                if est.path is not None:
                    est.save()

    def worker_theta(self, info: dict[str, Any]) -> float | None:
        """A cluster worker's own Theta from what it reported at load (its GPU's free memory, or
        its share of its node's available memory); None for local workers, which share the
        server's measured Theta, and when ``--kv-budget-bytes`` fixes it for all."""
        s = self.settings
        if s is None or self.profile is None or s.kv_budget_bytes is not None or "node_id" not in info:
            return None
        weights = self.profile.weight_bytes
        if "free_bytes" in info:  # measured after the weights were loaded
            device = info["free_bytes"] + weights
        elif "available_bytes" in info:
            device = info["available_bytes"] * min(1.0, s.ray_cpus_per_worker / max(1, info.get("host_cpus", 1))) + weights
        else:
            return None
        try:
            return MemoryModel.for_device(self.profile.delta, device, weights, reserve_frac=s.mem_reserve_frac).theta
        except ValueError:
            return None

    def predict(self, reqs: list[Request]) -> list[Prediction]:
        """Blocking (run it in a thread): the requests' predicted generation lengths, one embedding batch."""
        return self.predictor.predict([_item(r) for r in reqs])

    def repredict(self, reqs: list[Request]) -> None:
        """Re-estimate running requests from their first generated tokens (about a millisecond per
        call plus ~0.3 ms per request: run on the event loop at each checkpoint)."""
        from predictor.repredict import HeadRow

        rows = [HeadRow((r.prediction.p_runaway or 0.0) if r.prediction else 0.0,
                        float(r.prediction.tokens if r.prediction else r.max_tokens), r.input_tokens, r.max_tokens,
                        r.head_ids, r.head_state) for r in reqs]
        for r, p in zip(reqs, self.predictor.repredict(rows) or [], strict=False):
            r.reprediction = p

    def observe(self, req: Request) -> None:
        """Blocking (run it in a thread): a completed request teaches the predictor."""
        self.predictor.observe(_item(req), req.output_tokens, req.prediction, req.head_ids, req.head_states)


def build(settings: Settings, info: ModelInfo) -> Learners:
    """The policy named by ``settings.policy`` with its learners wired to ``info``."""
    model = ModelProfile.from_config(info.config, dtype_bytes=info.dtype_bytes, name=info.name)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    sched = build_scheduler(
        policy_settings(settings, info.device), model, get_hardware(hardware_for(info.device)),
        memory=memory_model(settings, info, served_profile(settings.policy, model),
                            workers=1 if info.device.startswith("cuda") else max(settings.num_workers, 1)),
        estimator_path=settings.state_dir / "estimator.json",
        estimator_source={"model": info.name, "device": info.device, "dtype": f"{info.dtype_bytes * 8}-bit"},
        sync_retrain=False,
    )
    if sched.estimator is not None:
        sched.estimator.kind = device_kind(info.device)  # the local workers' kind: the persisted state's
    learners = Learners(sched, settings=settings, profile=served_profile(settings.policy, model))
    policy = policy_class(settings.policy)
    if policy.needs_prediction:
        layer = state_layer(settings, info, True, worker_mode(policy.runner, settings.continuous_runner))
        learners.predictor = _predictor(settings, info.name, info.local_dir, layer)
    mem = sched.memory
    log.info("policy %s: Delta=%.0f B/token, Theta=%.2f GiB", sched.policy.name, mem.delta, mem.theta / 1024**3)
    return learners


def _predictor(settings: Settings, served_model: str, model_dir: str, layer: int | None):
    from predictor.predictor import LengthPredictor, PredictorConfig

    cfg = PredictorConfig(
        embedder=settings.embedder,
        form=settings.predictor_form,
        model_path=str(settings.predictor_model or settings.state_dir / "predictor.joblib"),
        model_is_explicit=settings.predictor_model is not None,
        train_set_path=str(settings.state_dir / "predictor_trainset.npz"),
        retrain_interval_s=settings.predictor_interval_s,
        max_defer_s=settings.predictor_max_defer_s,
        user_embedding=settings.predictor_user_embedding,
        served_model=served_model,
        probe_model_dir=model_dir,
        probe_layer=settings.predictor_probe_layer,
        state_layer=layer,
        embed_threads=1,  # the embedder shares the CPU with the workers; one thread is faster there
        retrain_in_subprocess=True,  # the fit must not take the workers' CPU or the event loop's GIL
    )
    return LengthPredictor(cfg)


def _item(req: Request) -> PredictInput:
    return PredictInput(app_text=req.app_text, user_text=req.user_text, input_tokens=req.input_tokens,
                        max_tokens=req.max_tokens)

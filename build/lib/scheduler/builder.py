"""One builder from settings to a scheduler: policy, memory model, cost model and estimator.

The server and the simulator both call :func:`build_scheduler`; what a policy needs (continuous
workers, quantized weights, an estimator, predictions) is read from its class attributes, never
from its name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from scheduler.costmodel import CostModel, HardwareProfile, ModelProfile
from scheduler.estimator import BatchTimeEstimator
from scheduler.factory import make_policy, policy_class
from scheduler.memory import MemoryModel
from scheduler.policy import Policy


@dataclass(frozen=True)
class PolicySettings:
    """The policy knobs of the server and the simulator; None keeps each policy's own default."""

    name: str = "magnus"
    batch_size: int | None = None  # VS/VSQ/GLP fixed batch size
    max_wait: float | None = None  # VS/VSQ partial-batch wait (= min_wait of GLP/ABP/Magnus)
    min_wait: float | None = None
    phi: float | None = None  # WMA threshold
    max_batch_size: int | None = None  # ABP/Magnus cap; CCB's most running requests per worker
    estimator_interval_s: float = 120.0  # the estimator's continual-learning period
    reserve: str | None = None  # PCB: high | point | max
    swap_factor: float | None = None  # PCB: order-swap preemption threshold


@dataclass
class Scheduler:
    """A built policy and the parts it was built from."""

    policy: Policy
    memory: MemoryModel  # Delta and Theta of one worker
    cost: CostModel  # the served model (quantized where the policy says) on the hardware
    estimator: BatchTimeEstimator | None = None  # when the policy uses one


def served_profile(name: str, model: ModelProfile) -> ModelProfile:
    """The model as policy ``name`` serves it (VSQ: quantized weights)."""
    bits = policy_class(name).quantize_bits
    return model.quantized(bits) if bits else model


def build_scheduler(
    settings: PolicySettings,
    model: ModelProfile,
    hardware: HardwareProfile,
    *,
    memory: MemoryModel | None = None,
    reserve_frac: float = 0.1,
    prior: HardwareProfile | None = None,
    estimator_path: str | os.PathLike[str] | None = None,
    estimator_source: dict[str, str] | None = None,
    sync_retrain: bool = True,
) -> Scheduler:
    """The policy ``settings.name`` for ``model`` on ``hardware``.

    ``memory``: Theta and Delta as measured by the caller (the server's free device memory);
    default ``CostModel.memory_model(reserve_frac)``. ``prior``: the hardware figures the
    estimator starts from (default ``hardware``); ``estimator_path`` / ``estimator_source``:
    where it persists its batches and what they were measured on; ``sync_retrain`` False when a
    background thread retrains it (the server)."""
    cls = policy_class(settings.name)
    profile = served_profile(settings.name, model)
    cost = CostModel(profile, hardware)
    if memory is None:
        memory = cost.memory_model(reserve_frac=reserve_frac)
    estimator = None
    if cls.uses_estimator:
        estimator = BatchTimeEstimator(
            CostModel(profile, prior or hardware), interval_s=settings.estimator_interval_s,
            path=estimator_path, sync_retrain=sync_retrain, source=estimator_source,
        )
    policy = make_policy(
        settings.name, batch_size=settings.batch_size, max_wait=settings.max_wait, min_wait=settings.min_wait,
        phi=settings.phi, max_batch_size=settings.max_batch_size, memory=memory, estimator=estimator,
        reserve=settings.reserve, swap_factor=settings.swap_factor,
    )
    return Scheduler(policy, memory, cost, estimator)

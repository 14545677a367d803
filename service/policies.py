"""Build the configured scheduling policy (and its learners) for the served model."""

from __future__ import annotations

from scheduler.policy import Policy
from scheduler.vs import VanillaPolicy
from service.model import ModelInfo
from service.settings import Settings


def build_policy(settings: Settings, info: ModelInfo) -> Policy:
    if settings.policy in ("vs", "vsq"):
        return VanillaPolicy(batch_size=settings.batch_size, max_wait=settings.max_wait)
    raise ValueError(f"policy {settings.policy!r} is not available yet")

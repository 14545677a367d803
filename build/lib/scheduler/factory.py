"""``make_policy(name, **params)``: build a policy by name (DESIGN §3)."""

from __future__ import annotations

import inspect
from typing import Any

from scheduler.ccb import CCBPolicy
from scheduler.pcb import PredictiveContinuousPolicy
from scheduler.policy import Policy
from scheduler.predictive import ABPPolicy, GLPPolicy, MagnusPolicy
from scheduler.vs import VanillaPolicy, VSQPolicy

POLICIES: dict[str, type[Policy]] = {
    "vs": VanillaPolicy,
    "vsq": VSQPolicy,
    "glp": GLPPolicy,
    "abp": ABPPolicy,
    "magnus": MagnusPolicy,
    "ccb": CCBPolicy,
    "pcb": PredictiveContinuousPolicy,
}


def _accepted(cls: type[Policy]) -> set[str]:
    return {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


#: Every parameter some policy takes (plus ``max_wait``/``min_wait``, which map to each other).
KNOWN_PARAMS: frozenset[str] = frozenset(
    {"max_wait", "min_wait"}.union(*(_accepted(c) for c in POLICIES.values()))
)


def policy_class(name: str) -> type[Policy]:
    """The policy class registered as ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[key]


def make_policy(name: str, *, strict: bool = False, **params: Any) -> Policy:
    """A policy by name: ``vs``, ``vsq``, ``glp``, ``abp``, ``magnus``, ``ccb`` or ``pcb``.

    ``params`` go to the policy's constructor. One settings dict can serve every policy: a known
    parameter that the chosen policy does not take (e.g. ``batch_size`` for ``magnus``) is
    dropped unless ``strict``; an unknown name always raises ``TypeError``. ``max_wait`` (VS,
    VSQ: how long a partial batch waits) and ``min_wait`` (GLP, ABP, Magnus: how long a batch may
    gather companions) are the same knob and each is accepted for the other. ``None`` values mean
    "use the default".
    """
    cls = policy_class(name)
    key = cls.name
    unknown = set(params) - KNOWN_PARAMS
    if unknown:
        raise TypeError(f"unknown policy parameter(s): {sorted(unknown)}")
    accepted = _accepted(cls)
    kwargs = {k: v for k, v in params.items() if v is not None}
    for a, b in (("max_wait", "min_wait"), ("min_wait", "max_wait")):
        if a in kwargs and a not in accepted and b in accepted and b not in kwargs:
            kwargs[b] = kwargs.pop(a)
    extra = set(kwargs) - accepted
    if extra and strict:
        raise TypeError(f"policy {key!r} does not take {sorted(extra)}")
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})

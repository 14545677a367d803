"""Workers on a Ray cluster: one front end (one queue, predictor, estimator) for all of them.

The scheduler sees Ray workers as it sees local ones (``worker.ray_backend``); this module builds
their configs and handles, and grows the worker set when the cluster gains room (a node joined).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from service.engine import Engine
from service.model import ModelInfo
from service.settings import Settings
from worker.process import WorkerConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RayWorkers:
    """The cluster, the config every Ray worker gets, and how to make a handle for one."""

    cluster: Any  # worker.ray_backend.RayCluster
    template: WorkerConfig
    initial: int

    def factory(self) -> Callable[..., Any]:
        from worker.ray_backend import RayWorkerHandle

        return lambda i, cfg, on_message: RayWorkerHandle(i, cfg, on_message, self.cluster)

    def configs(self) -> list[WorkerConfig]:
        return [dataclasses.replace(self.template, extra=dict(self.template.extra)) for _ in range(self.initial)]


def ray_workers(settings: Settings, info: ModelInfo, local: WorkerConfig) -> RayWorkers:
    """Connect to the cluster; as many workers as ``num_workers`` or as its resources hold now."""
    from worker.loader import resolve
    from worker.ray_backend import RayCluster

    gpu = settings.device.startswith("cuda") or info.device.startswith("cuda")
    cluster = RayCluster(settings.ray_address, gpu, settings.ray_cpus_per_worker)
    template = dataclasses.replace(
        local, device="cuda:0" if gpu else "cpu",  # Ray gives each actor its own CUDA_VISIBLE_DEVICES
        extra={**local.extra, "model_source": resolve(settings.model, settings.served_model_name),
               "cache_dir": settings.cache_dir})
    n = settings.num_workers or cluster.capacity()
    if settings.ray_max_workers:
        n = min(n, settings.ray_max_workers)
    if n < 1:
        raise RuntimeError(f"the Ray cluster has no room for a worker ({cluster.options()} each)")
    log.info("ray: %d workers on %d nodes (%s each)", n, cluster.nodes(), cluster.options())
    return RayWorkers(cluster, template, n)


async def grow(engine: Engine, rw: RayWorkers, settings: Settings) -> None:
    """Add workers while the cluster has room (nodes that join), every ``ray_scale_interval_s``."""
    from worker.ray_backend import spare_workers

    while True:
        await asyncio.sleep(settings.ray_scale_interval_s)
        spare = await asyncio.to_thread(spare_workers, rw.cluster, engine.num_workers)
        if settings.ray_max_workers:
            spare = min(spare, settings.ray_max_workers - engine.num_workers)
        for _ in range(max(0, spare)):
            engine.add_worker(dataclasses.replace(rw.template, extra=dict(rw.template.extra)))

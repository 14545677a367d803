"""Workers as Ray actors anywhere in a Ray cluster, behind the same contract as local processes.

Each worker is an actor that runs the local worker's own body (``worker.process._main``) over a
pipe made of two ``ray.util.queue.Queue`` actors pinned to the server's node: batches and
cancel/preempt commands go in, token events and outcomes come out, exactly the messages of a
local worker. So a Ray worker behaves as a local one (static, transformers or iteration mode),
and the engine, core and policies do not know where it runs.

* **placement**: one accelerator per actor (``num_gpus=1``) on CUDA, else ``ray_cpus_per_worker``
  CPUs; Ray picks the node. A node that has not the weights converts them itself (the model
  source travels with the config).
* **death**: the actor's ``run`` call fails (``RayActorError``: the actor or its node died); the
  handle reports ``exit`` as a local process's death, the engine requeues its batch once and
  ``start`` creates a new actor wherever resources allow (it waits in Ray's queue until then).
* **growth**: ``RayCluster.spare_workers`` tells how many more workers the cluster's resources
  hold now, so the server adds workers when a node joins, without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from scheduler.contract import WorkBatch
from worker.process import WorkerConfig

log = logging.getLogger(__name__)


class _QueueConn:
    """The worker side of the pipe: ``multiprocessing.Connection``'s send/recv/poll over two Ray queues."""

    def __init__(self, inbox: Any, outbox: Any) -> None:
        self.inbox, self.outbox = inbox, outbox

    def send(self, obj: Any) -> None:
        self.outbox.put(obj)

    def recv(self) -> Any:
        return self.inbox.get(block=True)

    def poll(self) -> bool:
        return not self.inbox.empty()


class _Actor:
    """The Ray actor: loads the model and serves batches until told to stop (the local body)."""

    def run(self, cfg: WorkerConfig, inbox: Any, outbox: Any) -> dict[str, Any]:
        import ray

        from worker.process import _main

        src = cfg.extra.get("model_source")
        if src is not None and not os.path.isdir(cfg.model_dir):  # a node without the converted weights
            from worker.loader import materialize

            cfg.model_dir = materialize(src, cfg.extra["cache_dir"])
        ctx = ray.get_runtime_context()
        cfg.extra["info"] = {"node_id": ctx.get_node_id(), "backend": "ray"}  # in its ``ready`` report
        _main(_QueueConn(inbox, outbox), cfg)
        return {"node_id": ctx.get_node_id()}


def _driver_node_strategy():
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


class RayCluster:
    """The server's connection to a Ray cluster, and the resources one worker takes there."""

    def __init__(self, address: str | None, gpu: bool, cpus_per_worker: float) -> None:
        import ray

        if not ray.is_initialized():
            # the workers import the project from the server's directory (the same checkout on every node)
            ray.init(address=address or "auto", log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                               "TOKENIZERS_PARALLELISM": "false"}})
        self.gpu = gpu
        self.cpus = cpus_per_worker
        self.actor_cls = ray.remote(_Actor)

    def options(self) -> dict[str, Any]:
        if self.gpu:
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": self.cpus}

    def capacity(self) -> int:
        """Workers the whole cluster's resources hold (alive nodes)."""
        import ray

        total = ray.cluster_resources()
        if self.gpu:
            return int(total.get("GPU", 0))
        return int(total.get("CPU", 0) // self.cpus) if self.cpus > 0 else 0

    def nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive"))


class RayWorkerHandle:
    """Server-side handle of one Ray worker; the same interface and messages as ``WorkerHandle``
    (``on_message(index, kind, payload)`` from a reader thread), plus ``node``: the node it runs on."""

    def __init__(self, index: int, cfg: WorkerConfig, on_message: Callable[[int, str, Any], None],
                 cluster: RayCluster) -> None:
        self.index = index
        self.cfg = cfg
        self._on_message = on_message
        self.cluster = cluster
        self.actor: Any = None
        self.node: str | None = None
        self._inbox: Any = None
        self._run_ref: Any = None
        self._gen = 0  # a restarted actor's reader ignores the old one's leftovers

    def start(self) -> None:
        from ray.util.queue import Queue

        self._gen += 1
        pinned = {"num_cpus": 0, "scheduling_strategy": _driver_node_strategy()}
        self._inbox, outbox = Queue(actor_options=pinned), Queue(actor_options=pinned)
        self.actor = self.cluster.actor_cls.options(name=None, max_restarts=0, **self.cluster.options()).remote()
        self._run_ref = self.actor.run.remote(self.cfg, self._inbox, outbox)
        threading.Thread(target=self._read, args=(outbox, self._run_ref, self._gen), daemon=True,
                         name=f"magnus-ray-worker-{self.index}").start()

    def _read(self, outbox: Any, run_ref: Any, gen: int) -> None:
        import ray
        from ray.util.queue import Empty

        while True:
            try:
                kind, payload = outbox.get(block=True, timeout=0.5)
            except Empty:
                done, _ = ray.wait([run_ref], timeout=0)
                if done:
                    break
                continue
            except ray.exceptions.RayError:  # the queue's node is the server's: only at shutdown
                break
            if kind == "ready":
                self.node = payload.get("node_id")
            self._on_message(self.index, kind, payload)
        code: Any = 0
        try:
            ray.get(run_ref, timeout=5)
        except Exception as exc:  # noqa: BLE001 - the actor (or its node) died: reported as an exit
            code = f"ray: {type(exc).__name__}"
        for q in (outbox, self._inbox):
            try:
                ray.kill(q.actor)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        if gen == self._gen:
            self._on_message(self.index, "exit", code)

    def _put(self, obj: Any) -> None:
        if self._inbox is not None:
            self._inbox.put_nowait(obj)

    def submit(self, batch: WorkBatch) -> None:
        self._put(batch)

    def cancel(self, request_id: str) -> None:
        self._put(("cancel", request_id))

    def preempt(self, request_id: str) -> None:
        self._put(("preempt", request_id))

    def alive(self) -> bool:
        import ray

        if self._run_ref is None:
            return False
        done, _ = ray.wait([self._run_ref], timeout=0)
        return not done

    def kill(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit after its current batch; kill it if it does not."""
        import ray

        if self.actor is None:
            return
        self._gen += 1  # a stop is not a death
        try:
            self._put(None)
            ray.wait([self._run_ref], timeout=timeout)
        except Exception:  # noqa: BLE001, S110 - the cluster may be going away too
            pass
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001, S110
            pass


def spare_workers(cluster: RayCluster, current: int) -> int:
    """How many more workers the cluster holds now than the ``current`` ones."""
    try:
        return max(0, cluster.capacity() - current)
    except Exception:  # noqa: BLE001 - the cluster is unreachable for a moment: no change
        log.debug("ray capacity check failed", exc_info=True)
        return 0




"""One worker process per device, behind a pipe: batches in, token events and results out."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.contract import BatchOutput, Outcome, WorkBatch

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """What a worker process needs to load and run its model."""

    model_dir: str  # local directory (already materialized)
    device: str  # "cpu", "cuda:0", ...
    dtype: str = "auto"
    quantize: str = "none"  # none | int8 | 4bit
    mode: str = "static"  # static (one batch at a time) | transformers (its continuous batching) | iteration (our own)
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    mem_cap_bytes: int | None = None  # fault injection: KV cache cap below the real memory
    oom_every: int = 0  # fault injection: every Nth multi-request batch runs out of memory
    step_delay_s: float = 0.0  # fault injection: sleep after every decode step (a slow device)
    kv_headroom: int = 64  # spare KV-cache columns per layer, written in place (0: transformers' concatenation)
    early_exit: bool = True  # static batches: a row leaves the batch the step it ends (False: the paper's literal mode)
    state_layer: int | None = None  # iteration mode: report head states of this decoder layer (probe predictor)
    extra: dict[str, Any] = field(default_factory=dict)


def _main(conn, cfg: WorkerConfig) -> None:
    """Worker process body: load, announce, then run batches until told to stop."""
    # The parent owns the lifecycle (stop message, pipe EOF, kill): a Ctrl-C or a SIGTERM sent to
    # the whole process group must not abort the running batch while the server drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from scheduler.memory import delta_from_config
        from worker.loader import load_model, load_tokenizer, pick_dtype
        from worker.runner import BatchRunner

        dtype = pick_dtype(cfg.dtype, cfg.device)
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(cfg.device))
        model = load_model(cfg.model_dir, cfg.device, dtype, cfg.quantize)
        tok = load_tokenizer(cfg.model_dir)
        delta = int(delta_from_config(model.config, dtype.itemsize))
        send_lock = threading.Lock()

        def send(kind: str, payload: Any) -> None:
            with send_lock:
                conn.send((kind, payload))

        if cfg.mode == "transformers":
            from worker.continuous import ContinuousRunner

            runner: Any = ContinuousRunner(model, tok, send)
        elif cfg.mode == "iteration":
            from worker.iteration import IterationRunner

            runner = IterationRunner(model, tok, cfg.device, send, delta, cfg.mem_cap_bytes, cfg.step_delay_s,
                                     kv_headroom=cfg.kv_headroom, state_layer=cfg.state_layer)
        else:
            runner = BatchRunner(model, tok, cfg.device, delta, cfg.mem_cap_bytes, cfg.oom_every, cfg.step_delay_s,
                                 early_exit=cfg.early_exit, kv_headroom=cfg.kv_headroom)
        from worker.loader import device_kind

        info: dict[str, Any] = {"pid": os.getpid(), "device": cfg.device, "delta": delta,
                                "kind": device_kind(cfg.device), **cfg.extra.get("info", {})}
        if cfg.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            info.update(free_bytes=free, total_bytes=total)
        else:  # after the weights were loaded: what is left for the KV cache on this host
            import psutil

            info.update(available_bytes=psutil.virtual_memory().available, host_cpus=os.cpu_count() or 1)
        send("ready", info)
    except Exception:  # noqa: BLE001 - report any load failure to the parent, then exit
        conn.send(("fatal", traceback.format_exc()))
        return
    inbox = _Inbox(conn)
    if cfg.mode == "iteration":
        _serve_iteration(inbox, runner)
        return
    while True:
        try:
            msg = inbox.next()
        except EOFError:
            return
        if msg is None:
            if cfg.mode == "transformers":
                runner.stop()
            return
        if isinstance(msg, tuple):  # ("cancel", request id)
            if cfg.mode == "transformers":
                runner.cancel(msg[1])
            continue  # a static batch that already ended: nothing to drop
        batch: WorkBatch = msg
        if cfg.mode == "transformers":
            runner.submit(batch)
            continue
        try:
            done = runner.run(batch, lambda evs: send("tokens", evs),
                              on_rows=lambda rows, b=batch.batch_id: send("rows", (b, rows)), cancelled=inbox.cancelled)
        except Exception:  # noqa: BLE001 - a failing batch must not kill the worker
            done = BatchOutput(batch_id=batch.batch_id, outcome=Outcome.ERROR, rows=[], stats=None,
                               error=traceback.format_exc())
        inbox.cancels.clear()
        send("done", done)


def _serve_iteration(inbox: _Inbox, runner) -> None:
    """The iteration-level worker's loop: read every message that arrived, then one step."""
    while True:
        try:
            msgs = inbox.drain(block=not runner.busy)
        except EOFError:
            return
        for msg in msgs:
            if msg is None:
                return
            if isinstance(msg, tuple):  # ("cancel" | "preempt", request id)
                (runner.cancel if msg[0] == "cancel" else runner.preempt)(msg[1])
            else:
                runner.submit(msg)
        if runner.busy:
            runner.step()


class _Inbox:
    """The worker's pipe: cancellations that arrive while a batch runs are collected (polled
    between decode steps); anything else waits for the main loop."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.cancels: set[str] = set()
        self.held: deque[Any] = deque()

    def next(self) -> Any:
        return self.held.popleft() if self.held else self.conn.recv()

    def drain(self, block: bool) -> list[Any]:
        """Everything that arrived (waiting for one message first when ``block``)."""
        msgs = list(self.held)
        self.held.clear()
        if not msgs and block:
            msgs.append(self.conn.recv())
        while self.conn.poll():
            msgs.append(self.conn.recv())
        return msgs

    def cancelled(self) -> set[str]:
        """Request ids cancelled so far (a non-blocking read of the pipe)."""
        while self.conn.poll():
            msg = self.conn.recv()
            if isinstance(msg, tuple) and msg[0] == "cancel":
                self.cancels.add(msg[1])
            else:
                self.held.append(msg)
        return self.cancels


class WorkerHandle:
    """Parent-side handle of one worker process; ``on_message(kind, payload)`` is called from a
    reader thread for every message (``ready``, ``tokens``, ``rows`` (rows that ended early),
    ``done``, ``progress`` and ``preempted`` (iteration-level workers), ``fatal``, ``exit``)."""

    def __init__(self, index: int, cfg: WorkerConfig, on_message: Callable[[int, str, Any], None]) -> None:
        self.index = index
        self.cfg = cfg
        self._on_message = on_message
        self._ctx = mp.get_context("spawn")
        self.proc: mp.process.BaseProcess | None = None
        self._conn = None
        self._send_lock = threading.Lock()

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_main, args=(child, self.cfg), daemon=True, name=f"magnus-worker-{self.index}")
        self.proc.start()
        child.close()
        self._conn = parent
        threading.Thread(target=self._read, args=(parent, self.proc), daemon=True).start()

    def _read(self, conn, proc) -> None:
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                proc.join(timeout=5)
                self._on_message(self.index, "exit", proc.exitcode)
                return
            self._on_message(self.index, kind, payload)

    def submit(self, batch: WorkBatch) -> None:
        """Send a batch; the worker must be idle."""
        with self._send_lock:
            assert self._conn is not None
            self._conn.send(batch)

    def cancel(self, request_id: str) -> None:
        """Drop a running request's row (read by the worker between decode steps)."""
        with self._send_lock:
            if self._conn is not None:
                self._conn.send(("cancel", request_id))

    def preempt(self, request_id: str) -> None:
        """Ask an iteration-level worker to hand a running request back (it answers ``preempted``)."""
        with self._send_lock:
            if self._conn is not None:
                self._conn.send(("preempt", request_id))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit after its current batch; kill it if it does not."""
        if self.proc is None:
            return
        try:
            with self._send_lock:
                self._conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)

"""Retraining away from the serving process: one spawned child process at the lowest CPU priority.

A retrain (the arrival model with its cross-validated penalties and calibration, then the
re-predictor) takes 4-11 s on the 2-core test machine. On a thread of the server it competed with
the model's workers at their priority and could hold the GIL for long stretches: in pcb's 0.5 req/s
grid run every stream stalled 3.6 s at once, about when its first retrain was due. Measured with ``python -m bench.interference``
(``bench/results/interference_busy_cpu.md``): one CPU-bound thread beside a decoding worker makes
its steps 3.44x slower at normal priority, 0.96x at ``nice 19`` (1.22x in
``interference_cpu.md``). In a child at ``nice 19`` a retrain takes longer (60-104 s under load
in ``compare_pcb_refit_cpu``) and never blocks the event loop, but it still slows decoding on a
2-core machine: at 0.5 req/s pcb's mean was 1.20-1.22x with a retrain during the run than without
(``bench/results/compare_pcb_retrain*_r05_cpu.md``), also after the child's math libraries were
put on one thread each (below; no measurable change). So the server pauses the child (``SIGSTOP``)
while its workers have requests and lets it go on (``SIGCONT``) when they are idle: ``Refitter.fit``'s
``pause`` (``--predictor-max-defer-s`` bounds how long a retrain waits).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, TimeoutError
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from predictor.repredict import Repredictor, fit_from_training_set
from predictor.trainset import TrainingSet

if TYPE_CHECKING:
    from predictor.predictor import PredictorConfig

log = logging.getLogger(__name__)


def fit_models(cfg: PredictorConfig, train: TrainingSet, head_rows: int) -> tuple[Any, Repredictor | None]:
    """The configured arrival model fitted on ``train``, and a re-predictor fitted on its rows with
    first tokens when at least ``head_rows`` of them are there (else None)."""
    model = cfg.fit(train)
    oob = getattr(model, "oob", None)
    fresh = None if oob is None else fit_from_training_set(train, oob, cfg.quantile, cfg.seed, min_rows=head_rows)
    return model, fresh


def _lowest_priority() -> None:
    """The child's initializer: ``nice 19``, and one thread in every math library it loaded (BLAS
    and OpenMP pools size themselves to the cores; their idle threads spin, and a spinning thread
    beside the decoding worker stalls its steps even at ``nice 19``). Importing this module loaded
    every library a fit uses (numpy, scipy and scikit-learn)."""
    os.nice(19)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


_CAN_PAUSE = hasattr(signal, "SIGSTOP")  # POSIX; elsewhere the child is never paused
POLL_S = 0.1  # how often a running fit checks whether to pause or resume the child


class Refitter:
    """Runs ``fit_models`` in-process (``in_process=True``: tests, the CLI) or in one long-lived
    spawned child at ``nice 19`` (the server), started at the first call. A child that died is
    replaced at the next call. ``paused`` is true while the child is stopped by ``fit``'s ``pause``."""

    def __init__(self, in_process: bool = False) -> None:
        self.in_process = in_process
        self._pool: ProcessPoolExecutor | None = None
        self._pid: int | None = None
        self.paused = False

    def fit(self, cfg: PredictorConfig, train: TrainingSet, head_rows: int,
            pause: Callable[[], bool] | None = None) -> tuple[Any, Repredictor | None]:
        """``fit_models`` (blocking). In the child, ``pause`` is asked every ``POLL_S`` seconds: while
        it says true the child is stopped (``SIGSTOP``), and it continues when it says false."""
        if self.in_process:
            return fit_models(cfg, train, head_rows)
        if self._pool is None:
            # spawn, not fork: the server has threads (the event loop, the embedder's torch pool)
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_lowest_priority)
            self._pid = self._pool.submit(os.getpid).result()
        try:
            future = self._pool.submit(fit_models, cfg, train, head_rows)
            while True:
                try:
                    return future.result(timeout=POLL_S)
                except TimeoutError:
                    self._set_paused(pause is not None and pause())
        except BrokenProcessPool:
            log.warning("the retraining process died; a new one starts at the next retrain")
            self.close()
            raise
        finally:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused or self._pid is None or not _CAN_PAUSE:
            return
        try:
            os.kill(self._pid, signal.SIGSTOP if paused else signal.SIGCONT)
        except ProcessLookupError:  # it died: the pool reports that
            return
        self.paused = paused

    def close(self) -> None:
        self._set_paused(False)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pid = None

"""The length predictor the service and scheduler use: predict, observe, retrain in the background."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predictor.embedder import Embedder
from predictor.features import FeatureExtractor
from predictor.forest import ForestParams, LengthForest
from predictor.mixture import MixtureParams, RunawayMixture, load_length_model
from predictor.probe import PromptProbe, probe_name
from predictor.probe_mixture import ProbeMixture, probe_inputs
from predictor.refit import Refitter
from predictor.repredict import MIN_HEAD_ROWS, HeadRow
from predictor.trainset import ModelMismatchError, TrainingSet
from predictor.types import CHECKPOINTS, PredictInput, Prediction

log = logging.getLogger(__name__)

_APP_HISTORY = 512  # true lengths kept per application for the cold-start median
_MAX_APPS = 1024  # applications tracked for the cold-start median (least recently seen dropped)
_RECENT = 200  # finished requests in the rolling health window (/metrics)
FALLBACK_SOURCES = frozenset({"app_median", "max_tokens"})
FORMS = ("mixture", "paper", "probe")
LengthModel = LengthForest | RunawayMixture  # ProbeMixture is a RunawayMixture


@dataclass
class PredictorConfig:
    """Settings of ``LengthPredictor``; see DESIGN section 2.1 for the continual-learning rule."""

    embedder: str = "default"  # "default" (bundled all-MiniLM-L6-v2), a local path or a hub id
    form: str = "mixture"  # "mixture" (runaway classifier + ended-length regressor) | "paper" (the forest)
    # | "probe" (the mixture on the served model's hidden state of the prompt: predictor.probe)
    probe_model_dir: str | None = None  # form "probe": the served model's transformers directory
    probe_layer: int | None = None  # form "probe": layers run (None: predictor.probe.default_layer)
    # the decoder layer whose head states the workers report (None: none); the re-predictor of the
    # other forms learns from them as served requests bring them (form probe: its probe's layer)
    state_layer: int | None = None
    model_path: str | None = None  # model file to load at start / save to after retraining
    model_is_explicit: bool = False  # model_path was given by the user (--predictor-model), not the state dir
    train_set_path: str | None = None  # persisted continual-learning training set (.npz)
    n_estimators: int = 100
    max_depth: int | None = None
    min_samples_leaf: int = 1
    quantile: float = 0.9
    retrain_interval_s: float = 180.0
    err_abs: float = 10.0
    err_rel: float = 0.10
    min_train: int = 20  # below this, stay on the fallback
    seed: int = 0
    target: str = "ratio"  # what the trees learn (see predictor.forest.ForestParams.target)
    device: str | None = "cpu"  # embedder device (None: sentence-transformers picks)
    embed_threads: int | None = None  # torch threads while embedding (None: torch's default)
    n_jobs: int = 1  # forest threads (fit and predict)
    app_cache_size: int = 1024  # LRU entries for application-text embeddings
    served_model: str | None = None  # the served LLM; learned state for another one is not reused
    retrain_in_subprocess: bool = False  # fit in a spawned child at nice 19 (the server), not on a thread
    user_embedding: bool = False  # form mixture: read the user text's embedding (predictor.mixture)
    # with a ``busy`` hook (the server: its workers have requests), a due retrain waits for idle
    # workers, and its child is paused while they are busy, at most this long after it fell due
    max_defer_s: float = 0.0

    def __post_init__(self) -> None:
        if self.retrain_interval_s <= 0:
            raise ValueError("retrain_interval_s must be > 0")
        if self.max_defer_s < 0:
            raise ValueError("max_defer_s must be >= 0")
        if self.err_abs < 0 or self.err_rel < 0:
            raise ValueError("err_abs and err_rel must be >= 0")
        if self.min_train < 1:
            raise ValueError("min_train must be >= 1")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}")
        if self.form == "probe" and not (self.probe_model_dir and self.served_model):
            raise ValueError("form 'probe' needs probe_model_dir and served_model (the served model's files and name)")
        self.forest_params()  # validates the forest settings

    def fit(self, train: TrainingSet) -> LengthModel:
        """A model of the configured form fitted on ``train`` (blocking)."""
        if self.form == "paper":
            return LengthForest.fit(train, self.forest_params())
        form = ProbeMixture if self.form == "probe" else RunawayMixture
        return form.fit(train, MixtureParams(quantile=self.quantile, seed=self.seed, n_jobs=self.n_jobs,
                                             user_embedding=self.user_embedding))

    def forest_params(self) -> ForestParams:
        return ForestParams(n_estimators=self.n_estimators, max_depth=self.max_depth,
                            min_samples_leaf=self.min_samples_leaf, quantile=self.quantile,
                            seed=self.seed, n_jobs=self.n_jobs, target=self.target)


def reported_states(reports: Sequence[Mapping[int, Sequence[float]] | None]) -> np.ndarray | None:
    """Rows of head states by checkpoint (``TrainingSet.H``, NaN where a row reported none) from
    what workers reported; None when no row has any."""
    dims = {len(v) for rep in reports if rep for v in rep.values()}
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(f"head states of different sizes: {sorted(dims)}")
    H = np.full((len(reports), len(CHECKPOINTS), dims.pop()), np.nan, dtype=np.float16)
    for i, rep in enumerate(reports):
        for k, v in (rep or {}).items():
            if k in CHECKPOINTS:
                H[i, CHECKPOINTS.index(k)] = v
    return H


def select_for_training(predicted: Prediction | None, true_tokens: int, max_tokens: int, trained: bool,
                        err_abs: float = 10.0, err_rel: float = 0.10) -> bool:
    """Whether a finished request joins the training set (DESIGN 2.1, continual learning).

    Without a trained forest every request joins (so the first forest can be trained). With one,
    a request joins when its forest prediction, capped by its ``max_tokens`` as the scheduler
    caps it, missed the true length by more than ``err_abs`` tokens AND by more than
    ``err_rel * true_tokens``. A request without a forest prediction (none given, or a fallback
    made before the first forest arrived: source in ``FALLBACK_SOURCES``) joins: its error says
    nothing about the forest. Any other source (e.g. "" when the caller did not keep it) counts
    as a forest prediction.
    """
    if not trained or predicted is None or predicted.source in FALLBACK_SOURCES:
        return True
    guess = min(predicted.tokens, max_tokens) if max_tokens > 0 else predicted.tokens
    err = abs(guess - true_tokens)
    return err > err_abs and err > err_rel * true_tokens


@dataclass
class _Observed:
    app_text: str
    user_text: str
    input_tokens: int
    true_tokens: int
    max_tokens: int
    head_ids: list[int]
    head_states: Mapping[int, Sequence[float]] | None = None  # checkpoint -> the worker's head state


class LengthPredictor:
    """Generation-length predictor with continual learning (DESIGN section 2.1).

    With a trained forest, ``predict`` embeds the texts and runs the forest (source "forest").
    Cold start (no forest yet): the prediction is the running median of the true lengths
    observed for the same application text (last 512 per application, source "app_median"),
    else the request's ``max_tokens`` (source "max_tokens"). Every request observed during
    cold start joins the training set; the first forest is trained at the first due
    ``retrain_if_due`` once ``min_train`` rows are there.

    Thread-safe. ``predict`` blocks (embedding) and belongs on a worker thread; ``observe`` is
    cheap (it only queues the request; embedding happens at retraining). Retraining builds a
    new forest outside every lock that ``predict`` takes (in a child process at the lowest CPU
    priority with ``cfg.retrain_in_subprocess``: ``predictor.refit``) and swaps one reference;
    the only wait ``predict`` can see is the embedder running one chunk (32 texts) of retraining data.
    """

    def __init__(self, cfg: PredictorConfig, embedder: Embedder | None = None) -> None:
        """Loads the embedder (or uses the one given), then the model file and training set if
        present. Raises ``ModelMismatchError`` if either was built for another embedder or
        feature version, or if an explicit model file (``cfg.model_is_explicit``) was learned
        for another served model. With ``cfg.served_model`` set, a state-dir file learned for
        another (or an unrecorded) served model is skipped with a warning and listed in
        ``discarded_state``; it stays on disk until the next save overwrites it."""
        self.cfg = cfg
        self.embedder = embedder or Embedder(cfg.embedder, device=cfg.device, cache_size=cfg.app_cache_size,
                                             threads=cfg.embed_threads)
        self._features = FeatureExtractor(self.embedder)
        self.probe: PromptProbe | None = None
        if cfg.form == "probe":
            assert cfg.probe_model_dir is not None and cfg.served_model is not None
            self.probe = PromptProbe(cfg.probe_model_dir, cfg.served_model, cfg.probe_layer,
                                     threads=cfg.embed_threads)
        self._lock = threading.Lock()  # guards the state below; never held while embedding/fitting
        self._retrain_lock = threading.Lock()  # one retrain (or final persist) at a time
        self._refitter = Refitter(in_process=not cfg.retrain_in_subprocess)
        # what the head states the re-predictor reads are (predictor.probe.probe_name); None: no states
        self.state_source: str | None = self.probe.name if self.probe is not None else (
            probe_name(cfg.served_model, cfg.state_layer) if cfg.state_layer and cfg.served_model else None)
        self.discarded_state: list[str] = []  # files skipped: learned for another served model
        self._model: LengthModel | None = None
        if cfg.model_path and Path(cfg.model_path).exists():
            model = load_length_model(cfg.model_path, self.embedder.name, self.embedder.dim)
            if self._served_model_fits("model file", cfg.model_path, model.meta.served_model,
                                       explicit=cfg.model_is_explicit) and self._probe_fits(model, cfg.model_path):
                self._model = model
        train: TrainingSet | None = None
        if cfg.train_set_path and Path(cfg.train_set_path).exists():
            loaded = TrainingSet.load(cfg.train_set_path, self.embedder.name, self.embedder.dim)
            if self._served_model_fits("training set", cfg.train_set_path, loaded.served_model):
                train = loaded
        if train is None and self._model is not None and self._model.train is not None:
            train = self._model.train  # a CLI-trained model carries its training rows
        train = self._with_probe(train)
        if train.states is not None and train.states != self.state_source:  # another layer's: unusable
            train = dataclasses.replace(train, H=None, states=None)
        if cfg.served_model is not None and train.served_model != cfg.served_model:
            train = dataclasses.replace(train, served_model=cfg.served_model)  # new rows record it
        self._train = train
        self._pending: list[_Observed] = []
        self._apps: OrderedDict[str, deque[int]] = OrderedDict()
        for app, y in zip(train.apps, train.y, strict=True):
            self._remember(app, int(y))
        self._last_check: float | None = None
        self._due_since: float | None = None  # when the due retrain began waiting for idle workers
        # the server's hook: true while its workers have requests (see PredictorConfig.max_defer_s)
        self.busy: Callable[[], bool] | None = None
        self._train_dirty = False
        self._model_dirty = False
        self._phase = 0  # 0 idle, 1 embedding new rows, 2 fitting a forest, 4 due but waiting for idle workers
        self._counts = {"observed": 0, "selected": 0, "retrains": 0, "fallback_predictions": 0,
                        "forest_predictions": 0, "repredictions": 0, "repredictions_with_state": 0}
        self._recent: deque[tuple[float, bool, bool]] = deque(maxlen=_RECENT)  # (abs error, flagged, ran away)
        self._abs_err_sum = 0.0
        self._abs_err_n = 0
        self._last_retrain_s = -1.0  # none yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _probe_fits(self, model: LengthModel, path: str) -> bool:
        """A probe model needs this predictor's probe (the same served model and layer)."""
        want = getattr(model.meta, "probe", None)
        have = None if self.probe is None else self.probe.name
        if want is None or want == have:
            return True
        if self.cfg.model_is_explicit:
            raise ModelMismatchError(f"refusing model file {path}: it reads the probe {want!r}, but this "
                                     f"predictor has {have or 'none'} (--predictor-form probe, the same model "
                                     "and layer)")
        log.warning("ignoring model file %s: it reads the probe %r, this predictor has %s", path, want, have)
        self.discarded_state.append(str(path))
        return False

    def _with_probe(self, train: TrainingSet | None) -> TrainingSet:
        """The training set to continue from, with this predictor's probe features (or none): a
        set probed otherwise is started afresh (its features cannot be recomputed without texts)."""
        name = None if self.probe is None else self.probe.name
        if train is not None and train.probe == name:
            return train
        if train is not None and self.probe is None:
            return dataclasses.replace(train, Z=None, probe=None, H=None)
        if train is not None and len(train):
            log.warning("starting a fresh training set: the stored one has probe features %r, this predictor "
                        "needs %r", train.probe, name)
        Z = H = None
        if self.probe is not None:
            Z = np.zeros((0, self.probe.dim), dtype=np.float32)
            H = np.zeros((0, len(CHECKPOINTS), self.probe.dim), dtype=np.float16)
        return TrainingSet(self.embedder.name, self.embedder.dim, Z=Z, probe=name, H=H,
                           served_model=None if train is None else train.served_model)

    def _served_model_fits(self, what: str, path: str, recorded: str | None, explicit: bool = False) -> bool:
        """Whether a file learned for served model ``recorded`` may be used now.

        Without ``cfg.served_model`` every file fits. An explicit model file recording another
        served model raises ``ModelMismatchError``; one recording none is accepted. Otherwise a
        file recording another or no served model is skipped (warning, ``discarded_state``)."""
        served = self.cfg.served_model
        if served is None or recorded == served:
            return True
        if explicit:
            if recorded is None:
                log.info("%s %s records no served model; using it for %r", what, path, served)
                return True
            raise ModelMismatchError(
                f"refusing {what} {path}: it was learned for served model {recorded!r}, but the "
                f"service serves {served!r}. Train one for it (magnus predictor train --served-model "
                f"{served}) or leave out --predictor-model to learn from scratch."
            )
        learned_for = "an unrecorded served model" if recorded is None else repr(recorded)
        log.warning("ignoring %s %s: it was learned for %s, but the service serves %r; "
                    "starting fresh (the file is kept until the next save replaces it)",
                    what, path, learned_for, served)
        self.discarded_state.append(str(path))
        return False

    # -- prediction -----------------------------------------------------------------------
    def predict(self, items: list[PredictInput]) -> list[Prediction]:
        """Predictions for a batch of requests (blocking, thread-safe)."""
        if not items:
            return []
        with self._lock:
            model = self._model
        if model is None:
            with self._lock:
                self._counts["fallback_predictions"] += len(items)
                return [self._fallback(it) for it in items]
        apps, users = [it.app_text for it in items], [it.user_text for it in items]
        tokens = [it.input_tokens for it in items]
        if model.form == "probe":
            assert self.probe is not None  # a probe model is only kept with its probe
            X = probe_inputs(self.probe, apps, users, tokens)
        else:  # the paper's forest reads the user text's embedding; the mixture by its setting
            X = self._features.transform(apps, users, tokens, user=getattr(model, "reads_user_embedding", True))
        caps = np.array([it.max_tokens for it in items], dtype=np.float64)
        point, high, p_run = model.predict_lengths(X, caps, self.cfg.quantile if model.form == "paper" else None)
        with self._lock:
            self._counts["forest_predictions"] += len(items)
        return [_prediction(p, h, r, "forest" if model.form == "paper" else model.form)
                for p, h, r in zip(point, high, p_run, strict=True)]

    @property
    def can_repredict(self) -> bool:
        with self._lock:
            return self._model is not None and self._model.repredictor is not None

    def repredict(self, rows: list[HeadRow]) -> list[Prediction] | None:
        """Total-length predictions of running requests from their first generated tokens
        (``predictor.repredict``); None when the model has no re-predictor. Cheap (~1 ms)."""
        with self._lock:
            rp = None if self._model is None else self._model.repredictor
        if rp is None or not rows:
            return None
        if getattr(rp, "states", None) not in (None, self.state_source):  # learned from another layer
            rows = [dataclasses.replace(r, state=None) for r in rows]
        point, high, p_run = rp.predict(rows)
        with self._lock:
            self._counts["repredictions"] += len(rows)
            self._counts["repredictions_with_state"] += sum(r.state is not None for r in rows)
        return [_prediction(p, h, r, "repredicted") for p, h, r in zip(point, high, p_run, strict=True)]

    def _fallback(self, item: PredictInput) -> Prediction:
        history = self._apps.get(item.app_text)
        if history:
            arr = np.fromiter(history, dtype=np.float64)
            tokens = max(1, int(math.floor(float(np.median(arr)) + 0.5)))
            high = max(tokens, int(math.ceil(float(np.quantile(arr, self.cfg.quantile)))))
            return Prediction(tokens=tokens, high=high, source="app_median")
        limit = max(1, item.max_tokens)
        return Prediction(tokens=limit, high=limit, source="max_tokens")

    def _remember(self, app: str, true_tokens: int) -> None:
        history = self._apps.get(app)
        if history is None:
            history = self._apps[app] = deque(maxlen=_APP_HISTORY)
            while len(self._apps) > _MAX_APPS:
                self._apps.popitem(last=False)
        else:
            self._apps.move_to_end(app)
        history.append(true_tokens)

    # -- continual learning ---------------------------------------------------------------
    def observe(self, item: PredictInput, true_tokens: int, predicted: Prediction | None,
                head_ids: Sequence[int] = (), head_states: Mapping[int, Sequence[float]] | None = None) -> None:
        """A request finished with ``true_tokens`` generated; ``predicted`` is what it was given;
        ``head_ids`` its first generated tokens and ``head_states`` the worker's head state at each
        checkpoint it reached, when known (the re-predictor learns from them).

        Cheap and non-blocking: updates the fallback medians and the error statistics, and
        queues the request for the next retraining if ``select_for_training`` picks it.
        """
        if true_tokens < 0:
            raise ValueError("true_tokens must be >= 0")
        with self._lock:
            self._counts["observed"] += 1
            self._remember(item.app_text, true_tokens)
            if predicted is not None:
                guess = min(predicted.tokens, item.max_tokens) if item.max_tokens > 0 else predicted.tokens
                self._abs_err_sum += abs(guess - true_tokens)
                self._abs_err_n += 1
                if predicted.source not in FALLBACK_SOURCES:
                    flagged = predicted.p_runaway is not None and predicted.p_runaway >= 0.5
                    self._recent.append((abs(guess - true_tokens), flagged,
                                         item.max_tokens > 0 and true_tokens >= item.max_tokens))
            if select_for_training(predicted, true_tokens, item.max_tokens, self._model is not None,
                                   self.cfg.err_abs, self.cfg.err_rel):
                self._counts["selected"] += 1
                self._pending.append(_Observed(item.app_text, item.user_text, item.input_tokens, true_tokens,
                                               item.max_tokens, list(head_ids), head_states))

    def _absorb_pending(self) -> int:
        """Embed the queued requests and append them to the training set; returns how many."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return 0
        X = self._features.transform([o.app_text for o in pending], [o.user_text for o in pending],
                                     [o.input_tokens for o in pending])
        y = np.array([o.true_tokens for o in pending], dtype=np.float32)
        caps = np.array([o.max_tokens for o in pending], dtype=np.float32)
        heads = TrainingSet.pack_heads([o.head_ids for o in pending])
        Z = H = None
        if self.probe is not None:
            Z, H = self.probe.encode_with_heads([o.app_text for o in pending], [o.user_text for o in pending],
                                                [o.head_ids for o in pending])
        elif self.state_source is not None:
            H = reported_states([o.head_states for o in pending])
        with self._lock:
            self._train = self._train.extended(X, y, [o.app_text for o in pending], caps, heads, Z, H,
                                               self.state_source)
            self._train_dirty = True
        return len(pending)

    def retrain_if_due(self, now: float) -> bool:
        """If ``retrain_interval_s`` has passed since the last check (or this is the first) and
        requests were selected since, add them to the training set and, once it holds
        ``min_train`` rows, fit a new forest (blocking) and swap it in. True if it swapped.
        (A training set already large enough with no forest, e.g. after a restart, also trains.)
        With ``busy`` set and ``cfg.max_defer_s`` > 0, a due retrain of a trained predictor waits
        while ``busy()`` says the workers have requests, and its fit is paused whenever they do,
        until ``max_defer_s`` after it fell due; the first model is fitted at once."""
        if not self._retrain_lock.acquire(blocking=False):
            return False  # another retrain is running
        try:
            with self._lock:
                if self._last_check is not None and now - self._last_check < self.cfg.retrain_interval_s:
                    return False
                untrained_but_ready = self._model is None and len(self._train) >= self.cfg.min_train
                if not self._pending and not untrained_but_ready:
                    self._last_check = now
                    return False
                if self._due_since is None:
                    self._due_since = now
                deferrable = self.cfg.max_defer_s - (now - self._due_since) if self._model is not None else 0.0
                if self.busy is not None and deferrable > 0 and self.busy():
                    self._phase = 4  # due, waiting for idle workers
                    return False
                self._last_check, self._due_since = now, None
                self._phase = 1
            pause_until = time.monotonic() + deferrable
            try:
                self._absorb_pending()
                with self._lock:
                    train = self._train
                    if len(train) >= self.cfg.min_train:
                        self._phase = 2
                if len(train) < self.cfg.min_train:
                    self._persist()
                    return False
                started = time.perf_counter()
                old = self._model.repredictor if self._model is not None else None
                # learn it again once the rows with first tokens are enough, and no fewer than the
                # one there is was fitted on (an offline re-predictor is not replaced by a smaller one)
                need = max(MIN_HEAD_ROWS, old.train_rows if old is not None else 0)
                busy = self.busy
                forest, fresh = self._refitter.fit(
                    self.cfg, train, need,
                    pause=None if busy is None else lambda: (not self._stop.is_set() and time.monotonic() < pause_until
                                                             and busy()))
                with self._lock:
                    forest.repredictor = fresh if fresh is not None else old
                    self._model = forest
                    self._model_dirty = True
                    self._counts["retrains"] += 1
                    self._last_retrain_s = time.perf_counter() - started
                log.info("length predictor retrained on %d rows (oob MAE %.1f) in %.2fs", len(train),
                         forest.meta.metrics.get("oob_mae", float("nan")), self._last_retrain_s)
                self._persist()
                return True
            finally:
                with self._lock:
                    self._phase = 0
        finally:
            self._retrain_lock.release()

    def _persist(self) -> None:
        """Write the training set and the model if they changed and paths are configured."""
        with self._lock:
            train, forest = self._train, self._model
            save_train, save_model = self._train_dirty, self._model_dirty
            self._train_dirty = self._model_dirty = False
        if save_train and self.cfg.train_set_path:
            train.save(self.cfg.train_set_path)
        if save_model and forest is not None and self.cfg.model_path:
            forest.save(self.cfg.model_path)

    def start_background(self) -> None:
        """Start a daemon thread that calls ``retrain_if_due(time.monotonic())`` periodically."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        poll = min(1.0, max(0.01, self.cfg.retrain_interval_s / 4))

        def loop() -> None:
            while not self._stop.wait(poll):
                try:
                    self.retrain_if_due(time.monotonic())
                except Exception:
                    log.exception("length predictor retraining failed")

        self._thread = threading.Thread(target=loop, name="length-predictor-retrain", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (waiting for a running retrain), then persist the training
        set (queued requests included) and the model, where paths are configured."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._retrain_lock:
            self._absorb_pending()
            self._persist()
            self._refitter.close()

    @property
    def trained(self) -> bool:
        with self._lock:
            return self._model is not None

    def stats(self) -> dict[str, float]:
        """Counters and gauges. ``retraining``: 0 idle, 1 embedding new rows, 2 fitting a forest, 3 the
        fit paused while the workers are busy, 4 due but waiting for idle workers.
        ``last_mae``: out-of-bag MAE of the current forest; ``online_mae``: MAE of the (capped)
        predictions of all observed requests. No NaN: -1.0 means not known yet."""
        with self._lock:
            forest = self._model
            recent = list(self._recent)
            out: dict[str, float] = {k: float(v) for k, v in self._counts.items()}
            out.update({
                "trained": float(forest is not None),
                "retraining": 3.0 if self._refitter.paused else float(self._phase),
                "train_size": float(len(self._train)),
                "pending": float(len(self._pending)),
                "last_mae": forest.meta.metrics.get("oob_mae", -1.0) if forest is not None else -1.0,
                "online_mae": self._abs_err_sum / self._abs_err_n if self._abs_err_n else -1.0,
                "rolling_mae": float(np.mean([e for e, _, _ in recent])) if recent else -1.0,
                "rolling_runaway_share": float(np.mean([r for _, _, r in recent])) if recent else -1.0,
                "rolling_runaway_precision": _share([r for _, f, r in recent if f]),
                "rolling_runaway_recall": _share([f for _, f, r in recent if r]),
                "last_retrain_s": self._last_retrain_s,
                "app_cache_hits": float(self.embedder.cache_hits),
                "app_cache_misses": float(self.embedder.cache_misses),
            })
        return out


def _prediction(point: float, high: float, p_runaway: float, source: str) -> Prediction:
    tokens = max(1, int(math.floor(point + 0.5)))
    return Prediction(tokens=tokens, high=max(tokens, int(math.ceil(high))), source=source,
                      p_runaway=float(p_runaway))


def _share(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else -1.0

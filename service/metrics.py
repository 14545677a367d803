"""Prometheus metrics on a registry of their own per app: magnus_* series, and the common ones
also under vLLM's names (vllm:*, labelled ``model_name``) so dashboards built for vLLM work as they are.

Both names are fed by the same calls (``request_finished``, ``tokens_arrived``, the ``waiting`` and
``running`` gauges), so the two schemes never disagree."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

_LAT = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5, 10)
# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so vLLM's dashboards read the same quantiles
_VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
              40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_PER_TOKEN = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)
_VLLM_REQUEST = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length")


class TwinGauge:
    """One value under two names: a magnus_* gauge and a vllm:* gauge labelled with the model name."""

    def __init__(self, own: Gauge, vllm: Gauge) -> None:
        self._own, self._vllm = own, vllm
        self._child = None
        self.value = 0.0

    def bind(self, model_name: str) -> None:
        self._child = self._vllm.labels(model_name)
        self._child.set(self.value)

    def set(self, value: float) -> None:
        self.value = float(value)
        self._own.set(self.value)
        if self._child is not None:
            self._child.set(self.value)

    def inc(self, amount: float = 1) -> None:
        self.set(self.value + amount)

    def dec(self, amount: float = 1) -> None:
        self.set(self.value - amount)


class Metrics:
    """The app's metrics. ``model_name`` labels the vllm:* series; the app sets it with
    ``set_model_name`` once the model is loaded (before any request is served)."""

    def __init__(self, model_name: str | None = None) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # the front end's process_cpu_seconds_total, memory, open files
        self.model_name: str | None = None
        self.requests = Counter("magnus_requests", "finished requests by status", ["status"], registry=r)
        self.latency = Histogram("magnus_request_latency_seconds", "end-to-end latency", buckets=_LAT, registry=r)
        self.queue_time = Histogram("magnus_queue_time_seconds", "arrival to dispatch", buckets=_LAT, registry=r)
        self.ttft = Histogram("magnus_time_to_first_token_seconds", "arrival to first token", buckets=_LAT, registry=r)
        self.tpot = Histogram("magnus_time_per_output_token_seconds", "per request: (finish - first token) / "
                              "(output tokens - 1), requests of 2 tokens or more", buckets=_PER_TOKEN, registry=r)
        self.itl = Histogram("magnus_inter_token_latency_seconds", "per generated token after the first: the gap "
                             "to the previous one (a gap spanning n tokens counts n times gap/n)",
                             buckets=_PER_TOKEN, registry=r)
        self.batch_size = Histogram(
            "magnus_batch_size", "requests per dispatched batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batches = Counter("magnus_batches", "finished batches by outcome", ["outcome"], registry=r)
        self.waiting = TwinGauge(
            Gauge("magnus_waiting_requests", "requests waiting for a batch", registry=r),
            Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", ["model_name"],
                  registry=r))
        self.running = TwinGauge(
            Gauge("magnus_running_requests", "requests in running batches", registry=r),
            Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", ["model_name"],
                  registry=r))
        self.prompt_tokens = Counter("magnus_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("magnus_generation_tokens", "valid generated tokens", registry=r)
        self.batch_total_tokens = Counter(
            "magnus_batch_total_tokens", "all tokens computed by batches, wasted ones included", registry=r
        )
        self.cancelled = Counter("magnus_cancelled_requests", "requests cancelled by the client", ["stage"], registry=r)
        self.predictions = Counter("magnus_predictions", "length predictions by source", ["source"], registry=r)
        self.preemptions = Counter("magnus_preemptions", "running requests put back to wait (pcb: memory or order)",
                                   registry=r)
        self.worker_restarts = Counter("magnus_worker_restarts", "worker processes restarted", registry=r)
        self.rejected = Counter(
            "magnus_rejected_requests", "requests refused before scheduling (queue_full, waiting_tokens, "
            "body_too_large, unauthorized, shutting_down)", ["reason"], registry=r)
        self.timeouts = Counter("magnus_timed_out_requests", "requests past request_timeout_s, cancelled",
                                ["stage"], registry=r)
        # vLLM's names for the common series (served model in ``model_name``, as vLLM labels them)
        m = ["model_name"]
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                   m, buckets=_VLLM_TTFT, registry=r)
        self.vllm_tpot = Histogram("vllm:time_per_output_token_seconds",
                                   "Histogram of time per output token in seconds.", m, buckets=_VLLM_PER_TOKEN,
                                   registry=r)
        self.vllm_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                  m, buckets=_VLLM_PER_TOKEN, registry=r)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                  m, buckets=_VLLM_REQUEST, registry=r)
        self.vllm_queue = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", m,
                                    buckets=_VLLM_REQUEST, registry=r)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=r)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", m,
                                              registry=r)
        self.vllm_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                    m + ["finished_reason"], registry=r)
        if model_name is not None:
            self.set_model_name(model_name)

    def set_model_name(self, model_name: str) -> None:
        """Label the vllm:* series with the served model's name; every series then shows from zero."""
        self.model_name = model_name
        self.waiting.bind(model_name)
        self.running.bind(model_name)
        for h in (self.vllm_ttft, self.vllm_tpot, self.vllm_itl, self.vllm_e2e, self.vllm_queue,
                  self.vllm_prompt_tokens, self.vllm_generation_tokens):
            h.labels(model_name)
        for reason in FINISH_REASONS:
            self.vllm_success.labels(model_name, reason)

    @property
    def _model(self) -> str:
        return self.model_name or ""

    def request_finished(self, *, latency: float, queue_time: float | None, ttft: float | None,
                         prompt_tokens: int, output_tokens: int, finish_reason: str,
                         decode_time: float | None = None) -> None:
        """A request that finished well (stop or length; ``requests{status}`` is counted by the
        caller for every outcome); ``decode_time`` is first token to finish
        (time per output token = decode_time / (output_tokens - 1), from 2 tokens on)."""
        m = self._model
        self.vllm_success.labels(m, finish_reason).inc()
        self.latency.observe(latency)
        self.vllm_e2e.labels(m).observe(latency)
        if queue_time is not None:
            self.queue_time.observe(queue_time)
            self.vllm_queue.labels(m).observe(queue_time)
        if ttft is not None:
            self.ttft.observe(ttft)
            self.vllm_ttft.labels(m).observe(ttft)
        if decode_time is not None and output_tokens >= 2:
            tpot = max(0.0, decode_time) / (output_tokens - 1)
            self.tpot.observe(tpot)
            self.vllm_tpot.labels(m).observe(tpot)
        self.prompt_tokens.inc(prompt_tokens)
        self.vllm_prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.vllm_generation_tokens.labels(m).inc(output_tokens)

    def tokens_arrived(self, gap: float, tokens: int) -> None:
        """``tokens`` generated tokens (after the first) arrived ``gap`` seconds after the previous
        one: each counts as an inter-token latency of gap / tokens."""
        if tokens <= 0:
            return
        per = max(0.0, gap) / tokens
        own, vllm = self.itl, self.vllm_itl.labels(self._model)
        for _ in range(tokens):
            own.observe(per)
            vllm.observe(per)

    def bind_learners(self, predictor_stats=None, estimator=None) -> None:
        """Expose the learners' state, read at scrape time (cold start is visible as trained=0)."""
        if predictor_stats is not None:
            for key, doc in (("trained", "1 once a forest is trained (0: cold-start fallback)"),
                             ("train_size", "rows in the predictor's training set"),
                             ("retrains", "predictor retraining rounds"),
                             ("last_mae", "out-of-bag MAE of the current model (tokens)"),
                             ("rolling_mae", "MAE of the last 200 finished requests' predictions, capped by "
                                             "max_tokens (tokens; -1 before any)"),
                             ("rolling_runaway_share", "share of the last 200 that ran to max_tokens"),
                             ("rolling_runaway_precision", "of the last 200 predicted to run away (p >= 0.5), "
                                                           "the share that did (-1: none predicted)"),
                             ("rolling_runaway_recall", "of the last 200 that ran away, the share predicted "
                                                        "(-1: none ran away)"),
                             ("repredictions", "running requests re-predicted from their first tokens"),
                             ("repredictions_with_state", "of those, re-predicted with the worker's head state "
                                                          "(iteration runner)"),
                             ("retraining", "0 idle, 1 embedding new rows, 2 fitting, 3 fit paused while the "
                                            "workers are busy, 4 due but waiting for idle workers"),
                             ("last_retrain_s", "seconds the last retraining's fit took (-1: none yet)")):
                g = Gauge(f"magnus_predictor_{key}", doc, registry=self.registry)
                g.set_function(lambda k=key: float(predictor_stats().get(k, -1.0)))
        if estimator is not None:
            Gauge("magnus_estimator_using_knn", "1 once the KNN batch-time estimator replaced the cost model",
                  registry=self.registry).set_function(lambda: float(estimator.using_knn))
            Gauge("magnus_estimator_train_size", "batches in the estimator's training set",
                  registry=self.registry).set_function(lambda: float(estimator.n_train))

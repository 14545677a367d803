"""Prometheus metrics (prefix magnus_), on a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("magnus_requests", "finished requests by status", ["status"], registry=r)
        self.latency = Histogram("magnus_request_latency_seconds", "end-to-end latency", buckets=_LAT, registry=r)
        self.queue_time = Histogram("magnus_queue_time_seconds", "arrival to dispatch", buckets=_LAT, registry=r)
        self.ttft = Histogram("magnus_time_to_first_token_seconds", "arrival to first token", buckets=_LAT, registry=r)
        self.batch_size = Histogram(
            "magnus_batch_size", "requests per dispatched batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batches = Counter("magnus_batches", "finished batches by outcome", ["outcome"], registry=r)
        self.waiting = Gauge("magnus_waiting_requests", "requests waiting for a batch", registry=r)
        self.running = Gauge("magnus_running_requests", "requests in running batches", registry=r)
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
                             ("repredictions", "running requests re-predicted from their first tokens")):
                g = Gauge(f"magnus_predictor_{key}", doc, registry=self.registry)
                g.set_function(lambda k=key: float(predictor_stats().get(k, -1.0)))
        if estimator is not None:
            Gauge("magnus_estimator_using_knn", "1 once the KNN batch-time estimator replaced the cost model",
                  registry=self.registry).set_function(lambda: float(estimator.using_knn))
            Gauge("magnus_estimator_train_size", "batches in the estimator's training set",
                  registry=self.registry).set_function(lambda: float(estimator.n_train))

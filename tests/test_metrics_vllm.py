"""vLLM-named metrics (vllm:*, labelled model_name) next to magnus_*, and the Grafana dashboard's
queries: a real engine fed fake worker events (exact inter-token latencies), then a real server
on the tiny Llama through the official client (counts against usage, every dashboard metric live)."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.contract import BatchOutput, Outcome, RowOutput, TokenEvent
from scheduler.factory import make_policy
from scheduler.request import Request
from service.engine import Engine
from service.launcher import start_server
from service.metrics import Metrics
from service.requestlog import RequestLog
from tests.conftest import Server
from worker.process import WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "magnus.json"
MODEL = "tiny"
VLLM_HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
                   "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
                   "vllm:request_queue_time_seconds")
VLLM_COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success")
VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


# -- helpers -----------------------------------------------------------------------------------------
def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(family name -> type, [(sample name, labels, value)]) of a Prometheus text exposition."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        samples += [(s.name, s.labels, s.value) for s in fam.samples]
    return types, samples


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


def scrape(srv: Server) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    r = httpx.get(srv.base_url + "/metrics", timeout=10)
    assert r.status_code == 200
    return parse(r.text)


_FUNCTIONS = {"sum", "rate", "irate", "increase", "histogram_quantile", "avg", "max", "min", "count"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression reads (label matchers, ranges and grouping dropped;
    an unknown function fails, so a typo cannot pass as a function)."""
    e = re.sub(r'"[^"]*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", e)
    names = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("("):
            assert m.group() in _FUNCTIONS, f"unknown function {m.group()!r} in {expr!r}"
        elif m.group() not in _KEYWORDS:
            names.append(m.group())
    return names


def family_of(name: str, types: dict[str, str]) -> str | None:
    """The family a sample name belongs to, checked against its type (``_bucket`` only on a
    histogram, ``_total`` only on a counter); None when there is none."""
    for suffix, kind in (("_bucket", "histogram"), ("_sum", "histogram"), ("_count", "histogram"),
                         ("_total", "counter")):
        if name.endswith(suffix) and types.get(name.removesuffix(suffix)) == kind:
            return name.removesuffix(suffix)
    return name if types.get(name) in ("gauge", "unknown") else None


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(re.fullmatch(r"label_values\((.+),\s*\w+\)", q).group(1))
    return exprs


# -- a real engine fed fake worker events --------------------------------------------------------------
class FakeHandle:
    """Stands in for a worker process: records what the engine submits."""

    def __init__(self) -> None:
        self.sent: list = []

    def submit(self, work) -> None:
        self.sent.append(work)


def test_inter_token_latency_per_event_gap_and_the_rest_at_finish(tmp_path: Path) -> None:
    metrics = Metrics(MODEL)
    log = RequestLog(tmp_path / "log.db")
    engine = Engine(make_policy("vs", batch_size=1, max_wait=0.0), [WorkerConfig("unused", "cpu")], log, metrics,
                    MODEL, handle_factory=lambda index, cfg, on_message: FakeHandle())
    engine.core.set_ready(0, True)
    try:
        st = engine.submit(Request("r0", prompt_tokens=3, max_tokens=8, arrival=0.0, prompt_ids=[1, 2, 3]), "completion")
        _, samples = parse(generate_latest(metrics.registry).decode())
        assert total(samples, "vllm:num_requests_waiting", model_name=MODEL) == 1
        assert total(samples, "magnus_waiting_requests") == 1
        (d,) = engine.core.schedule(time.monotonic())
        engine._send(d)
        assert metrics.running.value == 1 and engine._handles[0].sent

        t0 = time.time() - 2.0  # worker wall clock of the first token
        ev = [TokenEvent("r0", "a", t0, offset=0, tokens=1, token_offset=0),
              TokenEvent("r0", "b", t0 + 0.12, offset=1, tokens=1, token_offset=1),
              TokenEvent("r0", "cd", t0 + 0.62, offset=2, tokens=2, token_offset=2)]  # 2 tokens, 0.25 s each
        engine._on_message(0, "tokens", ev)
        engine._on_message(0, "tokens", ev[:2])  # a retried row repeats its tokens: not counted again
        # token 5 is the end token: no text, so no event; it counts at finish, after ~1.38 s
        engine._on_message(0, "done", BatchOutput(d.batch.id, Outcome.OK,
                                                  [RowOutput("r0", "abcd", 5, "stop", t0)], None))
        assert st.request.finished_at is not None and "r0" not in engine._streams
    finally:
        log.close()

    _, s = parse(generate_latest(metrics.registry).decode())
    itl = "vllm:inter_token_latency_seconds"
    m = {"model_name": MODEL}
    # 0.12 (le 0.15), 0.25 twice (le 0.3), ~1.38 (le 2.5): 4 = output tokens - 1
    assert [total(s, itl + "_bucket", le=le, **m) for le in ("0.1", "0.15", "0.3", "1.0", "2.5")] == [0, 1, 3, 3, 4]
    assert total(s, itl + "_count", **m) == total(s, "magnus_inter_token_latency_seconds_count") == 4
    decode = st.request.finished_at - st.request.first_token_at  # the ITLs add up to first token -> finish
    assert math.isclose(total(s, itl + "_sum", **m), decode, rel_tol=1e-9)
    assert math.isclose(total(s, "vllm:time_per_output_token_seconds_sum", **m), decode / 4, rel_tol=1e-9)
    assert total(s, "vllm:request_success_total", finished_reason="stop", **m) == 1
    assert total(s, "vllm:request_success_total", finished_reason="length", **m) == 0
    assert total(s, "vllm:generation_tokens_total", **m) == total(s, "magnus_generation_tokens_total") == 5
    assert total(s, "vllm:prompt_tokens_total", **m) == 3
    assert total(s, "vllm:num_requests_running", **m) == total(s, "magnus_running_requests") == 0


# -- a real server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The magnus policy, so the predictor's and the estimator's gauges are there too; decode steps
    of at least 20 ms, so token gaps dwarf message delays."""
    srv = start_server(tmp_path_factory.mktemp("vllm-metrics"), tiny_model_dir, policy="magnus",
                       served_model_name=MODEL, worker_threads=1, predictor_interval_s=3600,
                       estimator_interval_s=3600, step_delay_s=0.02)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def workload(server: Server) -> dict:
    """A streamed chat (its usage and the metrics right after it), then completions ending by
    length, by a stop string and after one token."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    after_stream = scrape(server)
    done = [("length" if streamed.completion_tokens == 16 else "stop", streamed)]
    base = client.completions.create(model=MODEL, prompt="x y z", max_tokens=12, temperature=0)
    stop = base.choices[0].text[2:4]
    for r in (base, client.completions.create(model=MODEL, prompt="x y z", max_tokens=12, temperature=0,
                                              stop=[stop]),
              client.completions.create(model=MODEL, prompt="Once", max_tokens=1, temperature=0)):
        done.append((r.choices[0].finish_reason, r.usage))
    return {"chunks": chunks, "after_stream": after_stream, "done": done}


def test_vllm_series_with_model_name_and_counts(server: Server, workload: dict) -> None:
    types, s = scrape(server)
    done = workload["done"]
    m = {"model_name": MODEL}
    for name, kind in ([(h, "histogram") for h in VLLM_HISTOGRAMS] + [(c, "counter") for c in VLLM_COUNTERS]
                       + [(g, "gauge") for g in VLLM_GAUGES]):
        assert types.get(name) == kind, name
        assert any(n.startswith(name) and lab.get("model_name") == MODEL for n, lab, _ in s), name
    assert [r for r, _ in done].count("stop") >= 1 and [r for r, _ in done].count("length") >= 1
    n = len(done)
    tokens = [u.completion_tokens for _, u in done]
    for reason in ("stop", "length"):
        assert total(s, "vllm:request_success_total", finished_reason=reason, **m) == [r for r, _ in done].count(reason)
    assert total(s, "vllm:request_success_total", **m) == total(s, "magnus_requests_total", status="ok") == n
    assert total(s, "vllm:generation_tokens_total", **m) == total(s, "magnus_generation_tokens_total") == sum(tokens)
    assert total(s, "vllm:prompt_tokens_total", **m) == sum(u.prompt_tokens for _, u in done)
    for h in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
              "vllm:request_queue_time_seconds"):
        assert total(s, h + "_count", **m) == n, h
    assert total(s, "vllm:time_per_output_token_seconds_count", **m) == sum(t >= 2 for t in tokens)
    # every token after a request's first: gaps between token events, the tokens no event carried
    # (an end token, a held-back stop-string prefix) at finish
    itl = total(s, "vllm:inter_token_latency_seconds_count", **m)
    assert itl == total(s, "magnus_inter_token_latency_seconds_count") == sum(t - 1 for t in tokens)
    assert math.isclose(total(s, "vllm:inter_token_latency_seconds_sum", **m),
                        total(s, "magnus_inter_token_latency_seconds_sum"), rel_tol=1e-9)
    assert total(s, "vllm:num_requests_running", **m) == total(s, "magnus_running_requests") == 0
    assert total(s, "vllm:num_requests_waiting", **m) == total(s, "magnus_waiting_requests") == 0


def test_streamed_request_latencies_are_consistent(workload: dict) -> None:
    _, s = workload["after_stream"]
    (_, usage) = workload["done"][0]
    n = usage.completion_tokens
    deltas = [c for c in workload["chunks"] if c.choices and c.choices[0].delta.content]
    assert n >= 8 and len(deltas) >= 3  # several token events: the per-event gaps were observed
    m = {"model_name": MODEL}
    ttft = total(s, "vllm:time_to_first_token_seconds_sum", **m)
    e2e = total(s, "vllm:e2e_request_latency_seconds_sum", **m)
    tpot = total(s, "vllm:time_per_output_token_seconds_sum", **m)
    itl = total(s, "vllm:inter_token_latency_seconds_sum", **m)
    assert total(s, "vllm:inter_token_latency_seconds_count", **m) == n - 1
    decode = tpot * (n - 1)  # first token -> finish
    assert 0 < ttft < e2e and math.isclose(ttft + decode, e2e, rel_tol=1e-6)
    # the gaps add up to first token -> last token event (-> finish exactly when tokens no event
    # carried are counted there); the steps take >= 20 ms each, the last message's delay far less
    assert 0.5 * decode < itl <= decode * (1 + 1e-9)


def test_dashboard_queries_read_live_metrics(server: Server, workload: dict) -> None:
    types, _ = scrape(server)
    queries = dashboard_queries()
    names = {n for q in queries for n in metric_names(q)}
    missing = sorted(n for n in names if family_of(n, types) is None)
    assert not missing, f"dashboard metrics not in /metrics: {missing}"
    used = {family_of(n, types) for n in names}
    assert set(VLLM_HISTOGRAMS) | set(VLLM_GAUGES) | {"vllm:generation_tokens", "vllm:request_success"} <= used
    assert {"magnus_requests", "magnus_batch_size", "magnus_preemptions", "magnus_predictor_rolling_mae",
            "magnus_predictor_rolling_runaway_precision", "magnus_predictor_rolling_runaway_recall",
            "magnus_estimator_using_knn"} <= used
    quantiles = [q for q in queries if q.startswith("histogram_quantile")]
    assert all(f"{h}_bucket" in " ".join(quantiles) for h in VLLM_HISTOGRAMS[:4])
    assert metric_names('sum(rate(vllm:e2e_request_latency_seconds_bucket{model_name=~"$m"}[5m])) by (le)') \
        == ["vllm:e2e_request_latency_seconds_bucket"]
    assert family_of("vllm:e2e_request_latency_seconds_total", types) is None  # suffix checked against type

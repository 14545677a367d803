"""Benchmark tooling: workload builder, corruptions, arrivals, summaries, CLI wiring.

The builder reads the machine's real man pages, gettext catalogs and standard library (small
limits keep it to seconds) and counts tokens with the default model's tokenizer.
"""

from __future__ import annotations

import argparse
import ast
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from bench.cli import register
from bench.loadgen.load import RequestRecord, arrival_times, batch_tokens, summarize, summary_stats
from bench.workload import corrupt, sources
from bench.workload.builder import MAX_TOKENS, BuildConfig, Workload, build_workload, max_tokens_for
from bench.workload.corpus import Corpus
from bench.workload.records import APPS, read_requests, write_jsonl
from bench.workload.tokens import count_tokens
from bench.workload.truth import pearson_by_app

SMALL = {"english_man_pages": 12, "translated_man_pages": 6, "stdlib_files": 25, "catalogs": 12}


@pytest.fixture(scope="module")
def workload() -> Workload:
    return build_workload(BuildConfig(n=90, seed=5, **SMALL))


@pytest.fixture(scope="module")
def functions() -> list[str]:
    docs, _ = sources.python_documents(sources.stdlib_files(40))
    return [code for _, doc in docs for _, code in doc]


@pytest.fixture(scope="module")
def license_sentences() -> list[str]:
    return [text for _, doc in sources.license_documents() for _, text in doc]


def test_workload_has_six_apps_and_schema(workload: Workload, tmp_path: Path) -> None:
    assert {r.app for r in workload.all} == set(APPS)
    assert [sum(r.app == app for r in workload.all) for app in APPS] == [15] * 6
    assert len({r.id for r in workload.all}) == len(workload.all) == 90
    assert {r.id for r in workload.train} | {r.id for r in workload.test} == {r.id for r in workload.all}
    assert not {r.id for r in workload.train} & {r.id for r in workload.test}
    translations = {r.instruction for r in workload.all if r.app == "machine_translation"}
    assert "Translate the following text from English to French." in translations
    assert "Translate the following text from Chinese to English." in translations
    for r in workload.all:
        d = r.to_dict()
        assert set(d) == {"id", "app", "instruction", "input", "max_tokens", "source"}
        assert r.instruction and r.input.strip() and r.source
    write_jsonl(tmp_path / "w.jsonl", (r.to_dict() for r in workload.all))
    assert read_requests(tmp_path / "w.jsonl") == workload.all


def test_max_tokens_depends_only_on_the_application(workload: Workload) -> None:
    for app in APPS:
        of_app = [r for r in workload.all if r.app == app]
        assert {r.max_tokens for r in of_app} == {MAX_TOKENS[app]} == {max_tokens_for(app)}
        # inputs of very different lengths (so answers too) get the same limit
        tokens = count_tokens([r.input for r in of_app])
        assert max(tokens) >= 4 * min(tokens)
    assert MAX_TOKENS["grammar_correction"] == 256 and MAX_TOKENS["bug_fixing"] == 512


def test_split_is_by_source_document(workload: Workload) -> None:
    train_sources = {r.source for r in workload.train}
    test_sources = {r.source for r in workload.test}
    assert train_sources and test_sources and not train_sources & test_sources
    kinds = {s.split(":")[0] for s in train_sources | test_sources}
    assert kinds == {"man", "catalog", "license", "python"}
    # a Python file's functions (code) and docstrings (prose) share one source, hence one side
    assert all(s.startswith("python:") and s.endswith(".py") for r in workload.all
               if r.app in ("code_translation", "bug_fixing", "code_commenting") for s in [r.source])
    for app in APPS:  # stratified: 25% of 15 per application, as far as whole documents allow
        assert 2 <= sum(r.app == app for r in workload.train) <= 6, app


def test_workload_is_deterministic(workload: Workload) -> None:
    again = build_workload(BuildConfig(n=90, seed=5, **SMALL))
    assert [r.to_dict() for r in again.all] == [r.to_dict() for r in workload.all]
    assert [r.id for r in again.train] == [r.id for r in workload.train]
    other = build_workload(BuildConfig(n=12, seed=6, **SMALL))
    assert {r.input for r in other.all} != {r.input for r in workload.all[:12]}


def test_inputs_span_short_to_long(workload: Workload) -> None:
    tokens = count_tokens([r.input for r in workload.all])
    assert min(tokens) <= 10 and max(tokens) >= 200


def test_corpus_samples_near_target() -> None:
    documents = sources.license_documents()
    corpus = Corpus.from_documents("licenses", documents, count_tokens)
    rng = np.random.default_rng(0)
    text, source = corpus.draw(60, rng)
    assert source in {name for name, _ in documents} and source.startswith("license:")
    units = [t for name, doc in documents if name == source for _, t in doc]
    assert any(text.startswith(t) for t in units) and any(text.endswith(t) for t in units)
    for target in (8, 60, 400):
        lengths = count_tokens([corpus.sample(target, rng) for _ in range(10)])
        assert max(lengths) <= 1.3 * target + 2  # separators between units are not counted
        assert np.median(lengths) >= 0.4 * target


def test_grammar_errors_change_text(license_sentences: list[str]) -> None:
    rng = np.random.default_rng(1)
    for sentence in license_sentences[:200]:
        wrong, n = corrupt.inject_grammar_errors(sentence, rng)
        assert n >= 1 and wrong != sentence
    text = "The program is distributed in the hope that it helps its users more than before, but without any warranty."
    for kind in corrupt.GRAMMAR_ERRORS:
        edits = corrupt._grammar_candidates(text, kind)
        assert edits and all(corrupt.apply_edits(text, [e]) != text for e in edits), kind


def test_bugs_change_code_and_keep_it_valid(functions: list[str]) -> None:
    rng = np.random.default_rng(2)
    kinds = set()
    for code in functions[:300]:
        result = corrupt.inject_bug(code, rng)
        if result is None:
            continue
        buggy, kind = result
        assert buggy != code
        ast.parse(buggy)
        kinds.add(kind)
    assert kinds == set(corrupt.BUG_KINDS)
    code = "def span(items, lo, hi):\n    return [x + 1 for x in items[lo:hi] if x < hi]\n"
    assert corrupt.inject_bug(code, rng)[0] != code


def test_rude_and_uncommented_inputs(functions: list[str], license_sentences: list[str]) -> None:
    rng = np.random.default_rng(3)
    for sentence in license_sentences[:50]:
        rude = corrupt.make_rude(sentence, rng)
        assert len(rude) > len(sentence)
    documented = [c for c in functions if '"""' in c and "#" in c][:20]
    assert documented
    for code in documented:
        bare = corrupt.strip_comments(code)
        assert bare is not None and len(bare) < len(code)
        tree = ast.parse(bare)
        assert all(ast.get_docstring(f) is None for f in ast.walk(tree) if isinstance(f, ast.FunctionDef))
        assert not any(t.startswith("#") for line in bare.splitlines() for t in [line.strip()])


def test_poisson_arrivals_have_the_rate() -> None:
    rng = np.random.default_rng(4)
    times = arrival_times(20_000, rate=5.0, burstiness=1.0, rng=rng)
    gaps = np.diff(times)
    assert np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    counts = np.histogram(times, bins=np.arange(0, times[-1], 1.0))[0]
    assert counts.var() / counts.mean() == pytest.approx(1.0, rel=0.1)  # Poisson counts
    bursty = np.diff(arrival_times(20_000, rate=5.0, burstiness=4.0, rng=rng))
    assert bursty.mean() == pytest.approx(0.2, rel=0.05)
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4.0, rel=0.15)  # gamma: CV^2 = B
    with pytest.raises(ValueError):
        arrival_times(3, rate=0.0, burstiness=1.0, rng=rng)


def test_summary_statistics() -> None:
    s = summary_stats(list(range(1, 101)))
    assert s == pytest.approx({"mean": 50.5, "p50": 50.5, "p90": 90.1, "p95": 95.05, "p99": 99.01})
    assert summary_stats([])["mean"] is None
    records = [
        RequestRecord("a", "mt", 10, send=100.0, first_token=100.5, end=101.0, completion_tokens=10),
        RequestRecord("b", "mt", 10, send=101.0, first_token=101.5, end=104.0, completion_tokens=30),
        RequestRecord("c", "gc", 10, send=102.0, status="http_503", error="busy"),
    ]
    summary = summarize(records, total_tokens=80)
    assert (summary.sent, summary.completed, summary.errors) == (3, 2, {"http_503": 1})
    assert summary.duration == 4.0 and summary.window == (100.0, 104.0)
    assert summary.request_throughput == 0.5
    assert summary.response_time["mean"] == 2.0 and summary.ttft["mean"] == 0.5
    assert summary.valid_token_throughput == 10.0 and summary.total_token_throughput == 20.0
    assert summary.response_time_with_unanswered["mean"] == 2.0  # an error that answered is no wait


def test_unanswered_requests_count_as_the_time_they_waited() -> None:
    # a policy that leaves requests unanswered must not look faster for it: the mean with the
    # unanswered counts each at the time until the client gave up (or, without that, the run's end)
    records = [
        RequestRecord("a", "mt", 10, send=100.0, first_token=100.5, end=102.0, completion_tokens=10),
        RequestRecord("b", "mt", 10, send=100.0, status="timeout", gave_up=130.0),
        # records from before gave_up was kept: a client timeout, and one cancelled at the grace's end
        RequestRecord("c", "mt", 10, send=101.0, status="timeout"),
        RequestRecord("d", "mt", 10, send=104.0, status="timeout", error="no answer 300 s after sending stopped"),
    ]
    s = summarize(records)
    assert s.response_time["mean"] == 2.0  # the answered one only, as vllm bench serve reports
    # a: 2 s; b: 30 s; c: until the run's last answer (102), 1 s; d: until the last send + 300 s
    assert s.response_time_with_unanswered["mean"] == pytest.approx((2.0 + 30.0 + 1.0 + 300.0) / 4)


def test_batch_tokens_sums_batches_in_window(tmp_path: Path) -> None:
    db = tmp_path / "log.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE batches (id INTEGER, policy TEXT, size INTEGER, max_prompt INTEGER, max_gen INTEGER,"
            " total_tokens INTEGER, valid_tokens INTEGER, start REAL, end REAL, oom INTEGER)"
        )
        rows = [(1, 99.0, 100), (2, 100.0, 7), (3, 103.5, 5), (4, 104.5, 1000)]
        conn.executemany(
            "INSERT INTO batches VALUES (?, 'vs', 4, 10, 10, ?, 1, ?, ?, 0)",
            [(i, total, start, start + 1) for i, start, total in rows],
        )
    assert batch_tokens(str(db), 100.0, 104.0) == 12


def test_pearson_by_app() -> None:
    rows = [{"app": "bug_fixing", "input_tokens": x, "output_tokens": 2 * x + 1} for x in range(1, 20)]
    rows += [{"app": "grammar_correction", "error": "timeout"}]
    stats = pearson_by_app(rows)
    assert stats["bug_fixing"]["pearson_r"] == pytest.approx(1.0)
    assert "grammar_correction" not in stats and stats["all"]["requests"] == 19


def test_cli_registers_bench_leaves() -> None:
    parser = argparse.ArgumentParser(prog="magnus")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "workload", "--out", "w", "--n", "12", "--seed", "3"])
    assert (args.n, args.seed, args.out) == (12, 3, Path("w")) and callable(args.func)
    args = parser.parse_args(["bench", "load", "--base-url", "http://127.0.0.1:1", "--workload", "w.jsonl",
                              "--rate", "2", "--burstiness", "2", "--n", "5", "--duration", "3"])  # fmt: skip
    assert (args.rate, args.burstiness, args.n, args.duration) == (2.0, 2.0, 5, 3.0)
    args = parser.parse_args(["bench", "truth", "w.jsonl", "t.jsonl", "--base-url", "http://x", "--concurrency", "2"])
    assert args.concurrency == 2 and callable(args.func)


def test_truth_from_request_log(tmp_path) -> None:
    from bench.workload.truth import truth_from_log
    from service.requestlog import RequestLog, RequestRecord

    log = RequestLog(tmp_path / "log.db")
    base = dict(model="m", kind="chat", prompt_tokens=30, max_tokens=50, finish_reason="stop", error=None,
                predicted_tokens=None, predicted_high=None, arrival=1.0, dispatch=1.0, first_token=1.5, finish=2.0,
                batch_id=1, worker=0)
    log.add(RequestRecord(id="a", app_text="Fix.", user_text="x = 1", input_tokens=4, completion_tokens=7,
                          status="ok", **base))
    log.add(RequestRecord(id="b", app_text="Fix.", user_text="y = 2", input_tokens=4, completion_tokens=0,
                          status="error", **base))
    log.close()
    rows = [{"id": "1", "app": "bug_fixing", "instruction": "Fix.", "input": "x = 1", "max_tokens": 50},
            {"id": "2", "app": "bug_fixing", "instruction": "Fix.", "input": "y = 2", "max_tokens": 50}]
    out = truth_from_log(rows, tmp_path / "log.db")
    assert [(r["id"], r["output_tokens"], r["input_tokens"]) for r in out] == [("1", 7, 4)]


def test_vllm_style_metrics_tpot_itl_goodput_and_short_half() -> None:
    from bench.loadgen.load import SLO

    fast = RequestRecord("a", "x", 16, send=0.0, first_token=0.5, end=1.5, completion_tokens=11,
                         chunk_times=[0.5, 0.6, 0.8, 1.5])
    slow = RequestRecord("b", "x", 16, send=0.0, first_token=3.0, end=9.0, completion_tokens=4,
                         chunk_times=[3.0, 9.0])
    failed = RequestRecord("c", "x", 16, send=0.0, status="http_400")
    assert fast.tpot == pytest.approx(0.1) and slow.tpot == pytest.approx(2.0) and failed.tpot is None
    s = summarize([fast, slow, failed], slo=SLO.parse("ttft:1 tpot:0.5"))
    assert s.tpot["mean"] == pytest.approx(1.05) and s.itl["p50"] == pytest.approx(0.45)  # gaps 0.1 0.2 0.7 6
    assert s.itl["mean"] == pytest.approx((0.1 + 0.2 + 0.7 + 6.0) / 4)
    assert s.goodput == pytest.approx(1 / 9.0)  # only "a" meets both objectives, over the 9 s run
    assert s.short_half_response_time["mean"] == pytest.approx(9.0)  # the shorter half: "b" (4 tokens)
    with pytest.raises(ValueError):
        SLO.parse("latency:3")

"""`magnus bench compare`: real servers on the tiny model, the bounded runner, the plots."""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from bench import cli
from bench.loadgen.client import make_client
from bench.loadgen.compare import COMPARE_METRICS, parse_settings
from bench.loadgen.load import RequestRecord, read_result, result_json, run_load, summarize
from bench.plots import plot_metrics
from bench.sim.cli import main as simulate
from bench.workload.records import Request, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 150


def write_workload(path: Path, tokenizer_dir: str, n: int = 6) -> None:
    """A few real workload rows with short limits; ``input_tokens``/``output_tokens`` make the
    same file usable as --warmup-train (the random tiny model always runs to its max_tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = read_jsonl(ROOT / "bench" / "workloads" / "test.jsonl")[:n]
    with path.open("w") as fh:
        for i, row in enumerate(rows):
            row["input"] = row["input"][:300]
            row["max_tokens"] = 4 + 2 * (i % 3)
            row["input_tokens"] = len(tok(row["input"], add_special_tokens=False).input_ids)
            row["output_tokens"] = row["max_tokens"]
            fh.write(json.dumps(row) + "\n")


def test_compare_tiny_model(tiny_model_dir: str, tmp_path: Path) -> None:
    workload, out, work = tmp_path / "wl.jsonl", tmp_path / "results", tmp_path / "work"
    write_workload(workload, tiny_model_dir)
    n, rates = 4, (2.0, 4.0)
    rc = cli.main([
        "compare", "--policies", "vs,magnus", "--rates", ",".join(map(str, rates)), "--workload", str(workload),
        "--n", str(n), "--duration", "20", "--grace", "60", "--model", tiny_model_dir,
        "--server-setting", "batch_size=4", "--server-setting", "max_wait=0.05",
        "--warmup-train", str(workload), "--work-dir", str(work), "--out-dir", str(out), "--name", "compare_t",
        "--no-progress",
    ])
    assert rc == 0
    doc = json.loads((out / "compare_t.json").read_text())
    assert doc["failed"] == {}
    rows = {(r["policy"], r["rate"]): r for r in doc["runs"]}
    assert set(rows) == {(p, r) for p in ("vs", "magnus") for r in rates}
    for row in rows.values():
        assert row["sent"] == n and row["completed"] == n and row["errors"] == 0, row
        assert row["request_throughput"] > 0 and row["mean_response_time"] > 0
        assert row["total_token_throughput"] >= row["valid_token_throughput"] > 0
        # the server's own counters over the run: its front end worked, and only magnus predicts
        assert row["server"]["front_end_cpu_s"] > 0 and row["server"]["preemptions"] == 0, row["server"]
        assert ("predictor_retrains" in row["server"]) == (row["policy"] == "magnus"), row["server"]
    assert doc["machine"]["cpu_count"] >= 1 and doc["config"]["n"] == n

    md = (out / "compare_t.md").read_text()
    assert "magnus bench compare --policies vs,magnus" in md and "| 4 | magnus | 4 / 4 |" in md
    assert "| 4 | vs | " in md.split("front-end CPU (s)")[1]  # the server-side table
    for metric in COMPARE_METRICS:
        assert_png(out / f"compare_t_{metric}.png")

    # every rate ran on a fresh server (nothing learned at one rate carried to the next), one request log
    for policy in ("vs", "magnus"):
        logs = doc["servers"][policy]["log"]
        assert len(logs) == len(rates) and len(set(logs)) == len(rates)
    # the predictive server ran on its own copy of the trained predictor, and used it
    assert (work / "magnus" / "predictor.joblib").exists() and not (work / "vs" / "predictor.joblib").exists()
    with sqlite3.connect(work / "magnus" / "log.db") as conn:
        predicted = conn.execute("SELECT COUNT(predicted_tokens) FROM requests").fetchone()[0]
    assert predicted >= n * len(rates)

    # each run's records replay in the simulator against that server's real log: the completion
    # ids join, so the overheads are fitted on every request, and Magnus gets its logged predictions
    for policy in ("vs", "magnus"):
        records = work / policy / f"records_{rates[-1]:g}.json"
        result = tmp_path / f"replay_{policy}.json"
        extra = ["--batch-size", "4"] if policy == "vs" else ["--prediction", "file"]
        assert simulate(["--replay", str(records), "--policies", policy, "--workers", "1", "--hardware", "cpu-local",
                         "--model-profile", str(Path(tiny_model_dir) / "config.json"), "--dtype", "float32",
                         "--max-wait", "0.05", "--ttft", "first-token", *extra, "--out", str(result),
                         "--no-progress"]) == 0
        replay = json.loads(result.read_text())
        assert replay["overheads"]["samples"] == n and replay["overheads"]["ingress_s"] > 0
        assert replay["measured"]["completed"] == replay["runs"][0]["summary"]["completed"] == n
        assert any("fitted to" in note and str(work / policy / "log.db") in note for note in replay["notes"])


def test_run_load_with_grace_never_hangs() -> None:
    """A server that accepts and never answers: the run ends after the grace period, all timeouts."""

    async def go() -> tuple[list, float]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(-1)  # read until the client gives up

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reqs = [Request(f"r{i}", "grammar_correction", "Correct.", "hello", 8) for i in range(3)]
        started = time.perf_counter()
        async with make_client(f"http://127.0.0.1:{port}", timeout=600) as client:
            records = await run_load(client, "m", reqs, [0.0, 0.1, 5.0], duration=0.5, progress=False,
                                     grace=0.5)
        server.close()
        return records, time.perf_counter() - started

    records, took = asyncio.run(go())
    assert [r.status for r in records] == ["timeout", "timeout"]  # the third arrives after --duration
    assert took < 5
    assert all(r.gave_up is not None and r.gave_up - r.send >= 0.4 for r in records)  # the grace, waited


def test_report_summarizes_kept_records_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [RequestRecord(f"r{i}", "mt", 10, send=float(i), first_token=i + 0.5, end=i + 2.0, completion_tokens=9)
            for i in range(3)] + [RequestRecord("late", "mt", 10, send=1.0, status="timeout", gave_up=41.0)]
    paths = []
    for policy, rate in (("vs", 0.5), ("magnus:batch_exit=literal", 0.5)):
        path = tmp_path / f"{policy}.json"
        path.write_text(json.dumps(result_json({"policy": policy, "rate": rate}, summarize(recs), recs)))
        paths.append(str(path))
    with gzip.open(tmp_path / "gz.json.gz", "wt") as f:  # kept records may be gzipped
        f.write(json.dumps(result_json({"policy": "ccb", "rate": 1.0}, summarize(recs), recs)))
    paths.append(str(tmp_path / "gz.json.gz"))
    assert cli.main(["report", *paths]) == 0
    out = capsys.readouterr().out
    assert "| 0.5 | vs | 3 / 4 | timeout: 1 |" in out and "| 0.5 | magnus:batch_exit=literal | 3 / 4 |" in out
    assert "| 1 | ccb | 3 / 4 |" in out
    assert "| 2.00 | 2.00 | 2.00 | 2.00 | 11.50 |" in out  # mean, p50, p90, p99 E2E; with the unanswered
    assert cli.main(["report", str(tmp_path / "missing.json")]) == 2


def test_plot_metrics(tmp_path: Path) -> None:
    rows = [
        {"policy": p, "rate": r, "request_throughput": r * k, "mean_response_time": 1 / k,
         "total_token_throughput": None}
        for k, p in enumerate(("vs", "magnus", "custom"), start=1) for r in (0.5, 1.0, 2.0)
    ]
    paths = plot_metrics(rows, tmp_path, "t")
    assert [p.name for p in paths] == ["t_request_throughput.png", "t_mean_response_time.png"]  # no data: no PNG
    for p in paths:
        assert_png(p)


def test_server_settings() -> None:
    assert parse_settings(["batch_size=8", "max-wait=0.1"]) == {"batch_size": "8", "max_wait": "0.1"}
    for bad in ("policy=vs", "batch_size", "predictor_model=x"):
        with pytest.raises(ValueError):
            parse_settings([bad])


def test_keep_records_copies_a_work_dir_into_the_repository(tmp_path: Path) -> None:
    from bench.keep_records import keep

    work = tmp_path / "work"
    recs = [RequestRecord("r0", "mt", 10, send=0.0, end=1.0, completion_tokens=3)]
    for policy in ("vs", "magnus:batch_exit=literal"):
        (work / policy).mkdir(parents=True)
        (work / policy / "records_0.5.json").write_text(
            json.dumps(result_json({"policy": policy, "rate": 0.5}, summarize(recs), recs)))
        with sqlite3.connect(work / policy / "log.db") as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE requests (id TEXT)")
            conn.execute("INSERT INTO requests VALUES ('x')")
    written = keep(work, tmp_path / "kept")
    assert sorted(p.name for p in written) == ["magnus_batch_exit=literal.log.db",
                                               "magnus_batch_exit=literal_r0.5.records.json.gz",
                                               "vs.log.db", "vs_r0.5.records.json.gz"]
    config, back = read_result(tmp_path / "kept" / "magnus_batch_exit=literal_r0.5.records.json.gz")
    assert config["policy"] == "magnus:batch_exit=literal" and back == recs
    assert not list((tmp_path / "kept").glob("*-wal")) and not list((tmp_path / "kept").glob("*-shm"))
    conn = sqlite3.connect(tmp_path / "kept" / "vs.log.db")
    assert conn.execute("SELECT id FROM requests").fetchall() == [("x",)]
    conn.close()

"""A retried batch never splices text onto what a streaming client already got: the engine's
delivery of worker events (a real Engine, core and SQLite request log; the worker's events are
fed to it as a retried batch would send them)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from scheduler.contract import RowOutput, TokenEvent
from scheduler.request import Request, RequestStatus
from scheduler.vs import VanillaPolicy
from service.engine import Delta, Engine
from service.errors import APIError
from service.metrics import Metrics
from service.requestlog import RequestLog
from worker.process import WorkerConfig


def engine(tmp_path: Path) -> Engine:
    # one worker, never started: the test plays its part
    return Engine(VanillaPolicy(batch_size=1, max_wait=0), [WorkerConfig(model_dir="unused", device="cpu")],
                  RequestLog(tmp_path / "log.db"), Metrics(), "m")


def running(eng: Engine, rid: str, streaming: bool):
    st = eng.submit(Request(id=rid, prompt_tokens=3, max_tokens=10, arrival=0.0, prompt_ids=[1, 2, 3]),
                    "completion", streaming)
    return st


def ev(rid: str, text: str, offset: int) -> TokenEvent:
    return TokenEvent(request_id=rid, text=text, time=time.time(), offset=offset, tokens=1)


def drain(q: asyncio.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_a_retry_that_reproduces_the_text_continues_the_stream(tmp_path: Path) -> None:
    async def main() -> list:
        eng = engine(tmp_path)
        st = running(eng, "a", streaming=True)
        eng._on_tokens([ev("a", "Hello", 0), ev("a", " wor", 5)])
        eng._on_tokens([ev("a", "Hello wor", 0), ev("a", "ld", 9)])  # the retry replays, then goes on
        return drain(st.events)

    got = asyncio.run(main())
    assert all(isinstance(e, Delta) for e in got)
    assert "".join(e.text for e in got) == "Hello world"


def test_a_diverging_retry_ends_the_stream_with_a_clear_error(tmp_path: Path) -> None:
    async def main() -> tuple[list, Request]:
        eng = engine(tmp_path)
        st = running(eng, "b", streaming=True)
        eng._on_tokens([ev("b", "Hello", 0)])
        eng._on_tokens([ev("b", "Help!", 0)])  # the retried batch sampled other tokens
        eng._on_tokens([ev("b", " more", 5)])  # nothing more reaches the client
        return drain(st.events), st.request

    got, req = asyncio.run(main())
    assert [e.text for e in got if isinstance(e, Delta)] == ["Hello"]
    err = got[-1]
    assert isinstance(err, APIError) and err.status == 500 and err.code == "retry_diverged"
    assert req.status == RequestStatus.FINISHED_ERROR


def test_divergence_seen_only_in_the_final_text_also_fails_the_stream(tmp_path: Path) -> None:
    async def main() -> list:
        eng = engine(tmp_path)
        st = running(eng, "c", streaming=True)
        eng._on_tokens([ev("c", "Hello", 0)])
        req = st.request
        req.status, req.finished_at = RequestStatus.FINISHED_STOPPED, time.monotonic()  # as the core finishes it
        eng._finished(req, RowOutput("c", "Jello there", 3, "stop", None))
        return drain(st.events)

    got = asyncio.run(main())
    assert isinstance(got[-1], APIError) and got[-1].code == "retry_diverged"


def test_a_non_streaming_request_keeps_the_final_runs_text(tmp_path: Path) -> None:
    async def main() -> list:
        eng = engine(tmp_path)
        st = running(eng, "d", streaming=False)
        eng._on_tokens([ev("d", "Hello", 0)])
        eng._on_tokens([ev("d", "Help!", 0)])  # nothing was shown to the client: no error
        req = st.request
        req.status, req.finished_at = RequestStatus.FINISHED_STOPPED, time.monotonic()  # as the core finishes it
        eng._finished(req, RowOutput("d", "Help! me", 3, "stop", None))
        return drain(st.events)

    got = asyncio.run(main())
    assert isinstance(got[-1], RowOutput) and got[-1].text == "Help! me"
    assert not any(isinstance(e, APIError) for e in got)

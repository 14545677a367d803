"""Fuzzing the HTTP API with schemathesis against the service's own OpenAPI schema.

Valid and invalid requests for every operation, with an API key: no 5xx, and every error has the
OpenAI shape. Examples are bounded and derandomized (the same inputs on every run); the context
is kept small so generated requests stay quick on the tiny model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from service.launcher import Server, start_server

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

KEY = "sk-fuzz"
EXAMPLES = int(os.environ.get("MAGNUS_FUZZ_EXAMPLES", "40"))  # per generation mode, over all operations


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("fuzz"), tiny_model_dir, policy="vs", served_model_name="tiny",
                       batch_size=8, max_wait=0.05, max_model_len=128, worker_threads=1, api_keys=KEY,
                       request_timeout_s=120)
    yield srv
    srv.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_http_api(fuzz_server: Server, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize="MAGNUS_FUZZ_RANDOM" not in os.environ, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(mode))
    def check(case: schemathesis.Case) -> None:
        if isinstance(case.body, dict) and "model" in case.body and mode is GenerationMode.POSITIVE:
            case.body["model"] = "tiny"  # reach the engine, not only the 404 for unknown models
        response = case.call(base_url=fuzz_server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            err = response.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], response.text

    check()
    assert sum(seen.values()) >= EXAMPLES // 2, seen
    assert fuzz_server.proc.poll() is None  # still serving
    print(f"fuzz {mode}: statuses {dict(sorted(seen.items()))}")

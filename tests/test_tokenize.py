"""vLLM's /tokenize and /detokenize on a real server (tiny random Llama with SmolLM2's tokenizer and
chat template): round trips, the same token counts as real completions (through the official
client), and errors in the OpenAI shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Server

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": "Answer in English."},
    {"role": "user", "content": "Hello, how are you today?"},
]


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0)


def post(srv: Server, path: str, body: object) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=60)


def test_prompt_round_trip(tiny_server: Server, client: openai.OpenAI) -> None:
    text = "Once upon a time, in a land far away: 42 dragons."
    r = post(tiny_server, "/tokenize", {"model": "tiny", "prompt": text})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] == len(out["tokens"]) > 5 and out["token_strs"] is None
    assert out["max_model_len"] == httpx.get(tiny_server.v1 + "/models").json()["data"][0]["max_model_len"]
    back = post(tiny_server, "/detokenize", {"model": "tiny", "tokens": out["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    with_strs = post(tiny_server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()  # no model: fine
    assert with_strs["tokens"] == out["tokens"] and len(with_strs["token_strs"]) == out["count"]
    assert all(isinstance(s, str) for s in with_strs["token_strs"])


def test_chat_tokens_are_what_a_chat_completion_feeds_the_model(
        tiny_server: Server, client: openai.OpenAI, tiny_model_dir: str) -> None:
    out = post(tiny_server, "/tokenize", {"model": "tiny", "messages": MESSAGES}).json()
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
    assert out["count"] == done.usage.prompt_tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in MESSAGES]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert out["tokens"] == tok.encode(text, add_special_tokens=False)
    assert post(tiny_server, "/detokenize", {"tokens": out["tokens"]}).json()["prompt"] == text
    # without the assistant prefix: a prefix of the same ids
    bare = post(tiny_server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < out["count"] and out["tokens"][: bare["count"]] == bare["tokens"]
    # the last (assistant) message left open: the rendering ends with its content
    partial = MESSAGES + [{"role": "assistant", "content": "I am fine, and"}]
    cont = post(tiny_server, "/tokenize", {"messages": partial, "continue_final_message": True}).json()
    assert post(tiny_server, "/detokenize", {"tokens": cont["tokens"]}).json()["prompt"].endswith("I am fine, and")


def test_completion_prompt_count_is_its_usage(tiny_server: Server, client: openai.OpenAI) -> None:
    prompt = "The quick brown fox jumps over the lazy dog"
    out = post(tiny_server, "/tokenize", {"prompt": prompt}).json()
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert out["count"] == done.usage.prompt_tokens
    raw = post(tiny_server, "/tokenize", {"prompt": prompt, "add_special_tokens": False}).json()
    assert raw["count"] <= out["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, 400, "tokens"),
    ("/detokenize", {"tokens": "12"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, 400, None),
    ("/tokenize", {"prompt": 123}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.role"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": True}, 400, None),
])
def test_bad_input_gets_an_openai_error(tiny_server: Server, path: str, body: object, status: int,
                                        param: str | None) -> None:
    r = post(tiny_server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if status == 404:
        assert err["code"] == "model_not_found"


def test_malformed_json_and_lone_surrogates_are_400s(tiny_server: Server) -> None:
    r = httpx.post(tiny_server.base_url + "/tokenize", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    lone = httpx.post(tiny_server.base_url + "/tokenize", content=b'{"prompt": "a\\ud800b"}',
                      headers={"content-type": "application/json"})  # valid JSON, not valid Unicode
    assert lone.status_code == 400 and lone.json()["error"]["code"] == "invalid_value"

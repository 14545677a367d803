"""The served model's own view of the prompt (predictor form ``probe``): the probe's features, the
probe mixture (censoring, runaway direction, calibration), continual learning, refusal of another
probe's files, and the CLI. Real parts: a randomly initialised 2-layer Llama with SmolLM2's
tokenizer, the bundled embedder, scikit-learn."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from sklearn.metrics import roc_auc_score

from predictor import LengthPredictor, ModelMismatchError, PredictInput, PredictorConfig
from predictor.cli import main as cli_main
from predictor.embedder import Embedder, get_embedder
from predictor.features import N_FEATURES
from predictor.mixture import MixtureParams, load_length_model
from predictor.probe import PromptProbe, chat_prompt
from predictor.probe_mixture import ProbeMixture, probe_rows
from predictor.trainset import TrainingSet
from predictor.types import CHECKPOINTS
from service.launcher import start_server


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder("default", threads=1)


def test_probe_is_the_hidden_state_of_the_prompts_last_token(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    probe = PromptProbe(tiny_model_dir, "tiny", layer=1)
    assert (probe.name, probe.dim) == ("probe:tiny@1", 64)
    pairs = [("Correct the grammar.", "He go to school."),
             ("Translate into French.", "The cat sits on the mat and looks at the garden for a long time.")]
    Z = probe.encode([a for a, _ in pairs], [u for _, u in pairs])  # one padded batch of two
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for (app, user), z in zip(pairs, Z, strict=True):
        text = chat_prompt(probe.tok, app, user)
        assert text.rstrip().endswith("assistant") and user in text
        ids = torch.tensor([probe.tok.encode(text, add_special_tokens=False)])
        with torch.inference_mode():
            want = full(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1].numpy()
        np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-4)  # left padding changes nothing
    assert not np.allclose(Z[0], Z[1])
    assert len(probe.model.layers) == 1  # the deeper layer was dropped at load
    # with the first generated tokens: the same Z, and each checkpoint's mean of the states from
    # the prompt's last token through generated token k - 1 (NaN past what the head holds)
    heads = [list(range(100, 140)), list(range(200, 207))]
    Z2, H = probe.encode_with_heads([a for a, _ in pairs], [u for _, u in pairs], heads)
    np.testing.assert_allclose(Z2, Z, rtol=1e-4, atol=1e-4)
    assert H.shape == (2, len(CHECKPOINTS), 64)
    for (app, user), head, h in zip(pairs, heads, H, strict=True):
        prompt = probe.tok.encode(chat_prompt(probe.tok, app, user), add_special_tokens=False)
        with torch.inference_mode():
            states = full(input_ids=torch.tensor([prompt + head]), output_hidden_states=True).hidden_states[1][0]
        for c, k in enumerate(CHECKPOINTS):
            if k <= len(head) + 1:
                want = states[len(prompt) - 1:len(prompt) - 1 + k].mean(0).numpy()
                np.testing.assert_allclose(h[c], want, rtol=1e-4, atol=1e-4)
            else:
                assert np.isnan(h[c]).all()
    assert not np.isnan(H[0, CHECKPOINTS.index(32)]).any() and not np.isnan(H[1, 0]).any()  # 7 tokens: k = 8
    assert np.isnan(H[1, 1]).all()
    with pytest.raises(ValueError, match="layer"):
        PromptProbe(tiny_model_dir, "tiny", layer=3)


def synthetic(n: int, rng: np.random.Generator, cap: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probe features whose first coordinate decides runaways (P = 0.85 above 0, 0.05 below) and
    whose second scales the ended length (log-normal around 40 * exp(0.5 * z1), sigma 0.25)."""
    Z = rng.normal(size=(n, 24)).astype(np.float32)
    tokens = rng.integers(5, 60, n).astype(np.float32)
    run = rng.random(n) < np.where(Z[:, 0] > 0, 0.85, 0.05)
    ended = np.exp(np.log(40.0) + 0.5 * Z[:, 1] + rng.normal(0, 0.25, n))
    y = np.where(run, cap, np.minimum(np.floor(ended), cap - 1))
    return probe_rows(Z, tokens), y, np.full(n, float(cap))


def probe_set(X: np.ndarray, y: np.ndarray, caps: np.ndarray) -> TrainingSet:
    n = len(y)
    feats = np.zeros((n, N_FEATURES), dtype=np.float32)
    feats[:, -1] = X[:, -1]
    return TrainingSet("e", 8, feats, y, ["a"] * n, max_tokens=caps, Z=X[:, :-1], probe="probe:m@1")


def test_probe_mixture_learns_the_runaway_direction_and_calibrates(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X, y, caps = synthetic(600, rng)
    model = ProbeMixture.fit(probe_set(X, y, caps), MixtureParams(quantile=0.9))
    assert model.form == "probe" and model.meta.probe == "probe:m@1"
    Xt, yt, capt = synthetic(2000, rng)
    point, high, p = model.predict_lengths(Xt, capt)
    assert roc_auc_score(yt >= capt, p) > 0.85
    assert 0.86 <= float((yt <= high + 1e-6).mean()) <= 0.94  # calibrated on the training rows
    # censored rows only taught the classifier: the ended-length centre stays at 40 * exp(0.5 z1),
    # also for rows that are likely runaways (a regressor on lengths would put them near the cap)
    mu = np.exp(model.regressor.predict(model.design(Xt, capt)))
    likely = p > 0.7
    ratio = mu[likely] / (40.0 * np.exp(0.5 * Xt[likely, 1]))
    assert 0.75 < float(np.median(ratio)) < 1.3
    # asked with a higher cap, a likely runaway's point moves to the new cap (300 was a lower bound)
    lifted, _, _ = model.predict_lengths(Xt[likely], np.full(int(likely.sum()), 1000.0))
    assert np.median(lifted) == 1000
    model.save(tmp_path / "p.joblib")
    again = load_length_model(tmp_path / "p.joblib")
    assert isinstance(again, ProbeMixture)
    np.testing.assert_allclose(again.predict_lengths(Xt, capt)[0], point)


def rows(n: int, seed: int) -> list[dict]:
    """Requests of two applications; 'echo' answers run away (hit the cap), 'sum' answers end."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        app = ("Repeat the text forever.", "Summarize the text in one word.")[i % 2]
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone"], size=int(rng.integers(3, 12))))
        out.append({"instruction": app, "input": words, "input_tokens": len(words.split()),
                    "output_tokens": 64 if i % 2 == 0 else int(rng.integers(3, 8)), "max_tokens": 64, "id": str(i)})
    return out


def as_input(r: dict) -> PredictInput:
    return PredictInput(r["instruction"], r["input"], r["input_tokens"], r["max_tokens"])


def test_probe_form_learns_continually_and_refuses_another_probe(tiny_model_dir: str, embedder: Embedder,
                                                                 tmp_path: Path) -> None:
    def make(**kw: object) -> LengthPredictor:
        base = {"form": "probe", "probe_model_dir": tiny_model_dir, "served_model": "tiny", "min_train": 20,
                "model_path": str(tmp_path / "m.joblib"), "train_set_path": str(tmp_path / "t.npz")}
        return LengthPredictor(PredictorConfig(**{**base, **kw}), embedder=embedder)  # type: ignore[arg-type]

    pred = make(probe_layer=1)
    data = rows(40, 0)
    for r in data:
        pred.observe(as_input(r), r["output_tokens"], None)
    assert pred.retrain_if_due(0.0)
    got = pred.predict([as_input(r) for r in rows(6, 1)])
    assert {p.source for p in got} == {"probe"}
    assert got[0].p_runaway > 0.5 > got[1].p_runaway  # the echo application runs away, the summary ends
    train = TrainingSet.load(tmp_path / "t.npz")
    assert train.probe == "probe:tiny@1" and train.Z.shape == (40, 64)
    assert load_length_model(tmp_path / "m.joblib").meta.probe == "probe:tiny@1"
    # another depth is another probe: the state dir's files are not used (and not read wrongly)
    other = make(probe_layer=2)
    assert not other.trained and str(tmp_path / "m.joblib") in other.discarded_state
    assert other.stats()["train_size"] == 0
    with pytest.raises(ModelMismatchError, match="probe"):
        make(probe_layer=2, model_is_explicit=True)
    with pytest.raises(ValueError, match="probe_model_dir"):
        PredictorConfig(form="probe")


def test_the_mixture_form_learns_from_the_head_states_workers_report(embedder: Embedder, tmp_path: Path) -> None:
    """No probe in the front end: the head states come with the finished requests (as the worker
    reported them at each checkpoint), the re-predictor learns runaways from them, and a predictor
    whose workers report another layer neither learns from those rows nor reads the states."""
    from predictor.repredict import HeadRow

    def make(layer: int) -> LengthPredictor:
        cfg = PredictorConfig(form="mixture", served_model="tiny", state_layer=layer, min_train=20,
                              model_path=str(tmp_path / "m.joblib"), train_set_path=str(tmp_path / "t.npz"))
        return LengthPredictor(cfg, embedder=embedder)

    rng = np.random.default_rng(0)
    pred = make(1)
    data = rows(80, 0)
    for i, r in enumerate(data):
        ran = i % 4 == 0  # both applications have runaways: only the states tell which
        r["output_tokens"] = 64 if ran else int(rng.integers(40, 60))
        states = {k: (rng.normal(size=8) + (3.0 if ran else 0.0)).tolist() for k in CHECKPOINTS if k < r["output_tokens"]}
        head = rng.integers(100, 5000, min(64, r["output_tokens"])).tolist()
        pred.observe(as_input(r), r["output_tokens"], None, head, states if i % 10 else None)
    assert pred.retrain_if_due(0.0)
    train = TrainingSet.load(tmp_path / "t.npz")
    assert train.states == "probe:tiny@1" and train.H.shape == (80, len(CHECKPOINTS), 8)
    assert np.isnan(train.H[0]).all() and np.isfinite(train.H[1, 0]).all()  # row 0 reported none
    rp = load_length_model(tmp_path / "m.joblib").repredictor
    assert rp.state_model is not None and rp.states == "probe:tiny@1"
    ran = np.array([i % 2 == 0 for i in range(40)])
    test = [HeadRow(0.3, 50.0, 5, 64, rng.integers(100, 5000, 32).tolist(),
                    (rng.normal(size=8) + (3.0 if x else 0.0)).tolist()) for x in ran]
    p = np.array([x.p_runaway for x in pred.repredict(test)])
    assert roc_auc_score(ran, p) > 0.9
    assert pred.stats()["repredictions_with_state"] == 40
    other = make(2)  # its workers report layer 2: layer 1's states are not theirs
    assert other.stats()["train_size"] == 80 and TrainingSet.load(tmp_path / "t.npz").states == "probe:tiny@1"
    assert other._train.H is None
    p_other = np.array([x.p_runaway for x in other.repredict(test)])
    blind = np.array([x.p_runaway for x in other.repredict([dataclasses.replace(t, state=None) for t in test])])
    np.testing.assert_allclose(p_other, blind)


def _train_with_heads(form: str, tiny_model_dir: str, tmp_path: Path) -> Path:
    """A model file of ``form`` trained on 40 rows with first tokens and their layer-1 head states."""
    rng = np.random.default_rng(0)
    data = rows(40, 0)
    for i, r in enumerate(data):
        r["output_tokens"] = 64 if i % 2 == 0 else int(rng.integers(20, 50))  # the 'sum' answers end mid-head
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in data)
    with open(tmp_path / "heads.jsonl", "w") as f:
        f.writelines(json.dumps({"id": r["id"], "head_ids": rng.integers(100, 5000, min(64, r["output_tokens"])).tolist()})
                     + "\n" for r in data)
    assert cli_main(["predictor", "train", "--form", form, "--probe-model", tiny_model_dir, "--probe-layer", "1",
                     "--served-model", "tiny", "--from-jsonl", str(tmp_path / "train.jsonl"),
                     "--heads", str(tmp_path / "heads.jsonl"), "--out", str(tmp_path / "p.joblib")]) == 0
    return tmp_path / "p.joblib"


@pytest.mark.parametrize("form", ["probe", "mixture"])
def test_a_pcb_server_repredicts_from_the_workers_head_states(form: str, tiny_model_dir: str, tmp_path: Path,
                                                              server_factory) -> None:
    """Trained with first tokens and their head states (so its re-predictor has a head-state model),
    a file of either form served by pcb on the iteration runner: the worker's head states reach the
    re-predictor (the mixture form runs no probe in the front end; the worker reports the states)."""
    path = _train_with_heads(form, tiny_model_dir, tmp_path)
    rp = load_length_model(path).repredictor
    assert rp.state_model is not None and rp.states == "probe:tiny@1"
    srv = server_factory(tiny_model_dir, policy="pcb", served_model_name="tiny", predictor_form=form,
                         predictor_probe_layer=1, predictor_model=path)
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="x")
    for r in rows(2, 3):
        out = client.chat.completions.create(model="tiny", max_tokens=40, temperature=0,
                                             messages=[{"role": "system", "content": r["instruction"]},
                                                       {"role": "user", "content": r["input"]}])
        assert out.usage.completion_tokens == 40  # the random model does not end: checkpoints 8..32 pass
    with_state = srv.metric("magnus_predictor_repredictions_with_state")
    total = srv.metric("magnus_predictor_repredictions")
    assert with_state >= 2 and with_state == total  # every re-prediction had the worker's head state


def test_a_server_retrains_its_predictor_only_while_its_workers_are_idle(tiny_model_dir: str, tmp_path: Path,
                                                                         server_factory) -> None:
    """A trained predictor's due retrain waits while a request runs (retraining gauge 4) and runs
    once the workers are idle (--predictor-max-defer-s, default 1800 s)."""
    path = _train_with_heads("mixture", tiny_model_dir, tmp_path)
    srv = server_factory(tiny_model_dir, policy="pcb", served_model_name="tiny", predictor_probe_layer=1,
                         predictor_model=path, predictor_interval_s=0.5, step_delay_s=0.04)
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="x")

    def ask(max_tokens: int, i: int = 0) -> int:
        r = rows(2, 5)[i]  # 0: an 'echo' request (predicted to run away), 1: a 'sum' one (predicted short)
        out = client.chat.completions.create(model="tiny", max_tokens=max_tokens, temperature=0,
                                             messages=[{"role": "system", "content": r["instruction"]},
                                                       {"role": "user", "content": r["input"]}])
        return out.usage.completion_tokens

    long = threading.Thread(target=ask, args=(220,))  # ~9 s of decoding at 0.04 s a step
    long.start()
    assert ask(100, 1) == 100  # beside it: a 'sum' request the random model never ends joins the next retrain
    seen: set[float] = set()
    while long.is_alive():
        seen.add(srv.metric("magnus_predictor_retraining"))
        assert srv.metric("magnus_predictor_retrains") == 0  # never while the request runs
        time.sleep(0.1)
    long.join()
    assert 4.0 in seen  # it was due and waited
    deadline = time.monotonic() + 120
    while srv.metric("magnus_predictor_retrains") < 1:
        assert time.monotonic() < deadline, "no retrain once the workers were idle"
        time.sleep(0.2)


def test_cli_trains_and_evaluates_the_probe_form_and_a_server_predicts_with_it(
        tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], server_factory) -> None:
    for name, seed in (("train", 0), ("test", 1)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows(40, seed))
    assert cli_main(["predictor", "train", "--form", "probe", "--probe-model", tiny_model_dir,
                     "--served-model", "tiny", "--from-jsonl", str(tmp_path / "train.jsonl"),
                     "--out", str(tmp_path / "p.joblib")]) == 0
    assert cli_main(["predictor", "eval", str(tmp_path / "test.jsonl"), "--model", str(tmp_path / "p.joblib"),
                     "--probe-model", tiny_model_dir, "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "Best cheap baseline" in out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["meta"]["probe"] == "probe:tiny@2"
    assert report["runaways"]["auc"] > 0.9  # the echo application, told apart by its prompt
    # a server on the same model predicts with the file (form probe: the front end probes prompts)
    srv = server_factory(tiny_model_dir, policy="pcb", served_model_name="tiny", predictor_form="probe",
                         predictor_model=tmp_path / "p.joblib")
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="x")
    for r in rows(4, 2):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", max_tokens=64, messages=[{"role": "system", "content": r["instruction"]},
                                                   {"role": "user", "content": r["input"]}])
        assert raw.parse().choices[0].message.content is not None
        assert int(raw.headers["x-magnus-predicted-tokens"]) >= 1
    metrics = httpx.get(srv.base_url + "/metrics").text
    by_source = dict(re.findall(r'^magnus_predictions_total\{source="(\w+)"\} (\S+)$', metrics, re.M))
    assert by_source == {"probe": "4.0"}  # every request predicted by the probe model, none by a fallback
    # another served model's name: the explicit file is refused at start, and /health says why
    bad = start_server(tmp_path / "bad", tiny_model_dir, wait=False, policy="pcb", served_model_name="other",
                       predictor_form="probe", predictor_model=tmp_path / "p.joblib")
    try:
        deadline, health = time.time() + 240, {}
        while time.time() < deadline and health.get("status") != "error":
            time.sleep(1)
            try:
                health = httpx.get(bad.base_url + "/health", timeout=2).json()
            except httpx.HTTPError:
                continue
        assert health.get("status") == "error" and "learned for served model 'tiny'" in health["detail"]
    finally:
        bad.stop()


def test_the_reported_head_state_layer_follows_the_form() -> None:
    """Two thirds deep (20 of 30) for the mixture and paper forms, the probe's depth (16) for the
    probe form, an explicit --predictor-probe-layer for all; none off the iteration runner."""
    from types import SimpleNamespace

    from service.model import state_layer
    from service.settings import Settings

    info = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30))
    assert state_layer(Settings(policy="pcb"), info, True, "iteration") == 20
    assert state_layer(Settings(policy="pcb", predictor_form="paper"), info, True, "iteration") == 20
    assert state_layer(Settings(policy="pcb", predictor_form="probe"), info, True, "iteration") == 16
    assert state_layer(Settings(policy="pcb", predictor_probe_layer=12), info, True, "iteration") == 12
    assert state_layer(Settings(policy="pcb"), info, True, "static") is None
    assert state_layer(Settings(policy="pcb", head_states=False), info, True, "iteration") is None
    assert state_layer(Settings(policy="ccb"), info, False, "iteration") is None

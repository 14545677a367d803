"""How early a runaway can be told apart: ranking quality after k generated tokens, k up to 128.

    .venv/bin/python -m bench.runaway_horizon TRAIN.jsonl TEST.jsonl TRAIN_HEADS.jsonl TEST_HEADS.jsonl \
        [--ks 16,32,48,64,96,128] [--model default] [--layer 20] [--arrival-layers 8,16,20,30] \
        [--out FILE.md] [--json FILE.json]

Issue 14 asks for a runaway ROC AUC of at least 0.95 after 32 generated tokens. This measures how
the AUC grows with k on the document split, so the goal can be put next to what the served model's
own outputs allow. For each k, classifiers are fitted on the training rows still running after k
tokens and scored on the test rows still running then (a runaway: ``output_tokens >= max_tokens``):

- **request + repetition**: application, input length, ``max_tokens`` and ``predictor.head``'s
  repetition measures of the first k tokens; gradient boosting (the re-predictor's classifier,
  without its arrival-model inputs);
- **head state**: the mean of one layer's hidden states over the prompt's last token and the first
  k - 1 generated ones (``predictor.probe.head_state_means``, what the iteration worker reports);
  L2 logistic regression, penalty by 5-fold AUC on the training rows (the re-predictor's state model);
- **both**: one L2 logistic regression over the two feature sets, standardised;
- **loop detector** (``worker.loops.is_looping``, checked after every token from 64 on, as the
  iteration worker does): the share of the running runaways it has flagged by k, and of the running
  rows that will end, the share it has flagged wrongly;
- **repeated 16-gram**, a looser marker of repetition: by k, the last 16 tokens had already occurred
  twice before; the same two shares.

``--arrival-layers``: the same question at arrival, before any token is generated: a logistic
regression on the request features (application, input length, ``max_tokens``) alone and with one
layer's state of the chat prompt's last token (what the probe form reads) or its mean over the
prompt's tokens, per layer (the last one after the model's final norm).

TRAIN_HEADS / TEST_HEADS: ``python -m bench.prefix TRUTH OUT --k 128`` (greedy, the served model's
chat prompt). A row whose regenerated head ends before k although its truth runs past k (batch
numerics can change a greedy answer) is left out at that k and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from predictor.cli import read_heads
from predictor.data import Row, load_jsonl
from predictor.head import head_features
from predictor.probe import PromptProbe, chat_prompt
from worker.loops import is_looping

LOOP_FROM = 64  # the iteration worker checks for a loop once a row has this many tokens
REPEAT_SPAN, REPEAT_TIMES = 16, 2  # the looser marker: a 16-gram seen twice before
_CS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # inverse L2 penalties tried for the logistic regressions


@dataclass
class HorizonAt:
    """Runaway ranking after ``k`` generated tokens, over the test rows still running then."""

    k: int
    running: int  # test rows still running after k tokens (their regenerated head agrees)
    runaways: int  # of which run to max_tokens
    left_out: int  # test rows whose regenerated head ended before k although the truth runs on
    auc_request_repetition: float
    auc_state: float
    auc_both: float
    auc_both_all_rows: float  # every test row, a row that ended before k scored 0 (its length is known)
    loop_recall: float  # running runaways the loop detector has flagged by k
    loop_false_flags: float  # running rows that will end, flagged by k
    repeat_recall: float  # the same for the repeated 16-gram
    repeat_false_flags: float


def first_loop(head: Sequence[int]) -> int | None:
    """The token count at which the worker's loop detector first fires on ``head`` (None: never)."""
    return next((j for j in range(LOOP_FROM, len(head) + 1) if is_looping(head[:j])), None)


def first_repeat(head: Sequence[int]) -> int | None:
    """The token count at which the last ``REPEAT_SPAN`` tokens have first occurred ``REPEAT_TIMES``
    times before (overlaps allowed; None: never)."""
    seen: Counter[tuple[int, ...]] = Counter()
    for j in range(REPEAT_SPAN, len(head) + 1):
        gram = tuple(head[j - REPEAT_SPAN:j])
        if seen[gram] >= REPEAT_TIMES:
            return j
        seen[gram] += 1
    return None


def _shares(fired: Sequence[int | None], k: int, ran: np.ndarray) -> tuple[float, float]:
    """Of the runaways and of the rows that end: the share whose marker fired by ``k`` tokens."""
    by = np.array([f is not None and f <= k for f in fired])
    return float(by[ran].mean()), float(by[~ran].mean())


@dataclass
class ArrivalAt:
    """Runaway ranking at arrival over every test row, from the request features plus one layer's
    view of the prompt (layer 0: the request features alone)."""

    layer: int
    auc_last: float  # with the state of the prompt's last token
    auc_mean: float  # with the mean state over the prompt's tokens


def _arrival_features(rows: Sequence[Row], apps: list[str]) -> np.ndarray:
    return np.array([[float(r.app == a) for a in apps] + [np.log1p(r.input_tokens), float(r.max_tokens or 0)]
                     for r in rows])


def _request_features(rows: Sequence[Row], heads: dict[str, list[int]], k: int, apps: list[str]) -> np.ndarray:
    return np.hstack([_arrival_features(rows, apps), np.array([head_features(heads[r.id][:k]) for r in rows])])


def _logistic(X: np.ndarray, y: np.ndarray, seed: int) -> Pipeline:
    """The L2 logistic regression whose penalty has the best 5-fold AUC on ``(X, y)``, refitted on all."""
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    best = None
    for c in _CS:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        auc = roc_auc_score(y, cross_val_predict(model, X, y, cv=folds, method="predict_proba")[:, 1])
        if best is None or auc > best[0]:
            best = (auc, model)
    assert best is not None
    return best[1].fit(X, y)


def _ran(rows: Sequence[Row]) -> np.ndarray:
    """Which rows ran away: answered until their ``max_tokens`` (a row without one never does)."""
    return np.array([r.max_tokens is not None and r.output_tokens >= r.max_tokens for r in rows], dtype=bool)


def _running(rows: Sequence[Row], heads: dict[str, list[int]], k: int) -> tuple[list[int], int]:
    """Indices of ``rows`` still running after ``k`` tokens whose head reaches k; rows left out."""
    live = [i for i, r in enumerate(rows) if r.output_tokens > k]
    keep = [i for i in live if len(heads[rows[i].id]) >= k]
    return keep, len(live) - len(keep)


def horizon(train: Sequence[Row], test: Sequence[Row], heads: dict[str, list[int]], states: dict[str, np.ndarray],
            ks: Sequence[int], seed: int = 0) -> list[HorizonAt]:
    """``HorizonAt`` for each k in ``ks``; ``states[id]``: the row's head states at ``ks``."""
    apps = sorted({r.app for r in train})
    ran_all = _ran(test)
    loops = {r.id: first_loop(heads[r.id]) for r in test}  # where each marker first fires, once per row
    repeats = {r.id: first_repeat(heads[r.id]) for r in test}
    out = []
    for c, k in enumerate(ks):
        tr, _ = _running(train, heads, k)
        te, left = _running(test, heads, k)
        rtr, rte = [train[i] for i in tr], [test[i] for i in te]
        ytr, yte = _ran(rtr), ran_all[te]
        Ftr, Fte = _request_features(rtr, heads, k, apps), _request_features(rte, heads, k, apps)
        Str = np.stack([states[r.id][c] for r in rtr])
        Ste = np.stack([states[r.id][c] for r in rte])
        gbt = HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=150, random_state=seed)
        p_req = gbt.fit(Ftr, ytr).predict_proba(Fte)[:, 1]
        p_state = _logistic(Str, ytr, seed).predict_proba(Ste)[:, 1]
        p_both = _logistic(np.hstack([Str, Ftr]), ytr, seed).predict_proba(np.hstack([Ste, Fte]))[:, 1]
        score_all = np.zeros(len(test))
        score_all[te] = p_both
        keep_all = np.array([r.output_tokens <= k for r in test])  # rows left out at k stay out of it
        keep_all[te] = True
        loop = _shares([loops[r.id] for r in rte], k, yte)
        repeat = _shares([repeats[r.id] for r in rte], k, yte)
        out.append(HorizonAt(
            k=k, running=len(te), runaways=int(yte.sum()), left_out=left,
            auc_request_repetition=float(roc_auc_score(yte, p_req)), auc_state=float(roc_auc_score(yte, p_state)),
            auc_both=float(roc_auc_score(yte, p_both)),
            auc_both_all_rows=float(roc_auc_score(ran_all[keep_all], score_all[keep_all])),
            loop_recall=loop[0], loop_false_flags=loop[1], repeat_recall=repeat[0], repeat_false_flags=repeat[1]))
        print(f"k={k}: {out[-1]}", file=sys.stderr, flush=True)
    return out


def prompt_states(model_dir: str, rows: Sequence[Row], layers: Sequence[int],
                  max_tokens: int = 1024) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (last-token states, mean states)}`` of the rows' chat prompts (cut to their last
    ``max_tokens`` tokens, as the probe cuts them), one unpadded forward per row."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    dim = int(model.config.hidden_size)
    out = {lay: (np.zeros((len(rows), dim), np.float32), np.zeros((len(rows), dim), np.float32)) for lay in layers}
    for i, r in enumerate(rows):
        ids = tok.encode(chat_prompt(tok, r.app_text, r.user_text), add_special_tokens=False)[-max_tokens:]
        with torch.inference_mode():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for lay in layers:
            out[lay][0][i] = hs[lay][0, -1].numpy()
            out[lay][1][i] = hs[lay][0].mean(0).numpy()
    return out


def arrival(train: Sequence[Row], test: Sequence[Row], states: dict[int, tuple[np.ndarray, np.ndarray]],
            seed: int = 0) -> list[ArrivalAt]:
    """``ArrivalAt`` for the request features alone (layer 0) and each layer of ``states``
    (rows: the training rows, then the test rows)."""
    apps = sorted({r.app for r in train})
    A = _arrival_features([*train, *test], apps)
    y = _ran([*train, *test])
    n = len(train)

    def auc(X: np.ndarray) -> float:
        return float(roc_auc_score(y[n:], _logistic(X[:n], y[:n], seed).predict_proba(X[n:])[:, 1]))

    base = auc(A)
    out = [ArrivalAt(0, base, base)]
    for lay, (last, mean) in sorted(states.items()):
        out.append(ArrivalAt(lay, auc(np.hstack([last, A])), auc(np.hstack([mean, A]))))
        print(f"arrival: {out[-1]}", file=sys.stderr, flush=True)
    return out


def arrival_markdown(results: Sequence[ArrivalAt]) -> str:
    """The at-arrival table of ``arrival``'s results."""
    lines = ["| at arrival, every test row | AUC: with the prompt's last token's state | AUC: with the mean over the prompt |",
             "| --- | ---: | ---: |"]
    for a in results:
        if a.layer == 0:
            lines.append(f"| application, input length, max_tokens alone | {a.auc_last:.3f} | - |")
        else:
            lines.append(f"| + layer {a.layer} | {a.auc_last:.3f} | {a.auc_mean:.3f} |")
    return "\n".join(lines)


def markdown(results: Sequence[HorizonAt], layer: int) -> str:
    """The table of ``horizon``'s results, one line per k (``layer``: the head states' layer)."""
    lines = ["| after k tokens | test rows running | runaways among them | AUC: request + repetition | "
             f"AUC: head state (layer {layer}) | AUC: both | AUC: both, all rows | "
             "loop detector: runaways flagged | rows that end, flagged | repeated 16-gram: runaways | "
             "rows that end | left out |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a in results:
        lines.append(f"| {a.k} | {a.running} | {a.runaways} | {a.auc_request_repetition:.3f} | {a.auc_state:.3f} | "
                     f"{a.auc_both:.3f} | {a.auc_both_all_rows:.3f} | {a.loop_recall:.1%} | "
                     f"{a.loop_false_flags:.1%} | {a.repeat_recall:.1%} | {a.repeat_false_flags:.1%} | {a.left_out} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("train_heads")
    ap.add_argument("test_heads")
    ap.add_argument("--ks", default="16,32,48,64,96,128", help="generated-token counts to measure at")
    ap.add_argument("--model", default="default", help="the served model (a `magnus serve --model` spec)")
    ap.add_argument("--layer", type=int, default=20, help="decoder layer of the head states")
    ap.add_argument("--arrival-layers", default="",
                    help="also rank at arrival with the prompt's states of these layers, e.g. 8,16,20,30")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the table (markdown) here")
    ap.add_argument("--json", help="write the results as JSON here")
    a = ap.parse_args(argv)
    from service.settings import Settings
    from worker.loader import materialize, resolve

    ks = sorted(int(k) for k in a.ks.split(","))
    train, test = load_jsonl(a.train), load_jsonl(a.test)
    heads = read_heads(a.train_heads) | read_heads(a.test_heads)
    short = [r.id for r in (*train, *test) if r.id not in heads]
    if short:
        raise SystemExit(f"{len(short)} rows have no head (e.g. {short[:3]})")
    if max(len(h) for h in heads.values()) < ks[-1]:
        raise SystemExit(f"the heads are shorter than k = {ks[-1]}: regenerate them with bench.prefix --k {ks[-1]}")
    model_dir = materialize(resolve(a.model), Settings().cache_dir)
    t0 = time.perf_counter()
    probe = PromptProbe(model_dir, a.model, a.layer)
    rows = [*train, *test]
    _, H = probe.encode_with_heads([r.app_text for r in rows], [r.user_text for r in rows],
                                   [heads[r.id] for r in rows], checkpoints=ks)
    assert H is not None
    states = {r.id: H[i] for i, r in enumerate(rows)}
    print(f"head states of {len(rows)} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results = horizon(train, test, heads, states, ks, a.seed)
    table = markdown(results, a.layer)
    at_arrival: list[ArrivalAt] = []
    if a.arrival_layers:
        t0 = time.perf_counter()
        pstates = prompt_states(model_dir, rows, [int(x) for x in a.arrival_layers.split(",")])
        print(f"prompt states of {len(rows)} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        at_arrival = arrival(train, test, pstates, a.seed)
        table += "\n\n" + arrival_markdown(at_arrival)
    print(table)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"layer": a.layer, "ks": ks, "train_rows": len(train), "test_rows": len(test),
                       "at": [asdict(r) for r in results], "arrival": [asdict(r) for r in at_arrival]}, f, indent=1)


if __name__ == "__main__":
    main()

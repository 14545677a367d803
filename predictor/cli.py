"""``magnus predictor ...``: train a length-predictor model file, evaluate it, show its metadata.

``register(sub)`` adds the ``predictor`` command to the console script's subparsers; every leaf
sets ``func(args) -> int``. ``python -m predictor.cli ...`` runs the same commands standalone.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from predictor.data import Row, load_jsonl, load_request_log
from predictor.embedder import Embedder
from predictor.evaluate import evaluate_groups, finalize, repredict_report, yardstick
from predictor.features import FeatureExtractor
from predictor.forest import TARGETS, ForestParams, LengthForest
from predictor.mixture import MixtureParams, RunawayMixture, load_length_model
from predictor.probe import PromptProbe, default_layer, default_state_layer, layer_of
from predictor.probe_mixture import ProbeMixture, probe_inputs, probe_rows
from predictor.repredict import HeadRow, fit_from_training_set
from predictor.trainset import TrainingSet
from predictor.types import CHECKPOINTS, last_checkpoint

#: Turns a ``--probe-model`` value (a model spec such as ``default``) into a transformers directory;
#: the ``magnus`` command installs the served model's resolver, standalone use takes a directory.
ModelResolver = Callable[[str], str]


def register(sub: argparse._SubParsersAction, resolve_model: ModelResolver | None = None) -> None:  # type: ignore[type-arg]
    """Add ``predictor train | eval | info`` to an argparse subparsers object."""
    p = sub.add_parser("predictor", help="generation-length predictor: train, evaluate, inspect")
    leaves = p.add_subparsers(dest="predictor_cmd", required=True)

    t = leaves.add_parser("train", help="train a model file from the request log or a JSONL file")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-log", metavar="DB", help="the service's SQLite request log (status = 'ok' rows)")
    src.add_argument("--from-jsonl", metavar="FILE",
                     help="JSONL rows: instruction, input, input_tokens, output_tokens[, app, max_tokens]")
    t.add_argument("--out", required=True, metavar="MODEL", help="model file to write (joblib)")
    t.add_argument("--form", choices=("mixture", "paper", "probe"), default="mixture",
                   help="mixture: runaway classifier + ended-length regressor, calibrated high estimate "
                        "(default); paper: the paper's random forest; probe: the mixture on the served "
                        "model's hidden state of the prompt (needs --probe-model and --served-model)")
    t.add_argument("--heads", metavar="FILE",
                   help="mixture, probe: also train the re-predictor on these rows' first generated tokens "
                        "(JSONL id, head_ids: python -m bench.prefix); with --probe-model, on the served "
                        "model's head states too (what an iteration worker reports while decoding)")
    t.add_argument("--user-embedding", action="store_true",
                   help="mixture: also read the user text's embedding (off: only the application's, cached; "
                        "a prediction then embeds no user text)")
    t.add_argument("--embedder", default="default",
                   help="'default' (bundled all-MiniLM-L6-v2), sentence-transformers/LaBSE, a path or hub id")
    t.add_argument("--device", default="cpu", help="embedder device (default: cpu)")
    t.add_argument("--served-model", default=None, metavar="NAME",
                   help="the served model whose lengths the rows hold; recorded in the file so a server "
                        "serving another model refuses it (default: not recorded)")
    t.add_argument("--threads", type=int, default=None, help="torch threads for embedding (default: torch's)")
    _probe_args(t, resolve_model)
    t.add_argument("--n-estimators", type=int, default=100)
    t.add_argument("--max-depth", type=int, default=None)
    t.add_argument("--min-samples-leaf", type=int, default=1)
    t.add_argument("--quantile", type=float, default=0.9,
                   help="level of the high estimate (paper: of the per-tree predictions; mixture: calibrated)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target", choices=TARGETS, default="ratio",
                   help="what the trees learn: output/input token ratio (default) or the length itself")
    t.add_argument("--n-jobs", type=int, default=1)
    t.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of rows kept out of training to measure the model (stored in its metadata)")
    t.add_argument("--drop-truncated", action="store_true",
                   help="with --from-log: leave out requests stopped by their max_tokens")
    t.add_argument("--limit", type=int, default=None, help="use at most this many rows (first ones)")
    t.set_defaults(func=cmd_train)

    e = leaves.add_parser("eval", help="evaluate a model file against true lengths and every cheap baseline")
    e.add_argument("file", metavar="FILE", help="JSONL rows with true output_tokens")
    e.add_argument("--model", required=True, metavar="MODEL")
    e.add_argument("--paper", metavar="MODEL", help="also score this paper-form model file (a 'paper form' row)")
    e.add_argument("--mixture", metavar="MODEL", help="also score this mixture-form model file (a 'mixture' row)")
    e.add_argument("--heads", metavar="FILE",
                   help="first generated tokens of FILE's rows (JSONL id, head_ids): score the model's "
                        "re-predictor after 16 and 32 tokens")
    e.add_argument("--train", metavar="FILE",
                   help="JSONL to fit the baselines on (default: the training rows stored in the model)")
    e.add_argument("--embedder", default=None,
                   help="embedder to load (default: the one recorded in the model; must match it)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None, help="torch threads for embedding (default: torch's)")
    _probe_args(e, resolve_model)
    e.add_argument("--quantile", type=float, default=None, help="override the model's high quantile")
    e.add_argument("--runaway-threshold", type=float, default=0.5,
                   help="flag a runaway when P(length >= max_tokens) from the trees is at least this")
    e.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    e.add_argument("--predictions", metavar="OUT.jsonl",
                   help="also write FILE's rows with the forest's predicted_tokens and predicted_high (what "
                        "`magnus simulate --prediction file` replays: the real predictor's errors, not an oracle)")
    e.set_defaults(func=cmd_eval)

    i = leaves.add_parser("info", help="print a model file's metadata")
    i.add_argument("model", metavar="MODEL")
    i.set_defaults(func=cmd_info)


def _probe_args(p: argparse.ArgumentParser, resolve_model: ModelResolver | None) -> None:
    p.add_argument("--probe-model", metavar="MODEL",
                   help="form probe, and head states with --heads: the served model (" + (
                       "a model spec as `magnus serve --model` takes, e.g. default" if resolve_model
                       else "its transformers directory") + ")")
    p.add_argument("--probe-layer", type=int, default=None,
                   help="decoder layers run by the probe (default: just past the middle); the head states' layer "
                        "(default for the other forms: two thirds deep)")
    p.set_defaults(resolve_model=resolve_model)


def _probe(args: argparse.Namespace, served_model: str | None, layer: int | None,
           default: Callable[[int], int] = default_layer) -> PromptProbe:
    if not args.probe_model or not served_model:
        raise SystemExit("form probe needs --probe-model and the served model's name (--served-model)")
    where = args.resolve_model(args.probe_model) if args.resolve_model else args.probe_model
    return PromptProbe(where, served_model, layer, threads=args.threads, default=default)


def _model_rows(model: Any, rows: Sequence[Row], embedder: Embedder, probe: PromptProbe | None) -> np.ndarray:
    """What ``model.predict_lengths`` reads for ``rows``: probe rows for a probe model, else features."""
    if model.form == "probe":
        assert probe is not None
        return probe_inputs(probe, [r.app_text for r in rows], [r.user_text for r in rows],
                            [r.input_tokens for r in rows])
    return _featurize(rows, embedder)


def _featurize(rows: Sequence[Row], embedder: Embedder) -> np.ndarray:
    return FeatureExtractor(embedder).transform([r.app_text for r in rows], [r.user_text for r in rows],
                                                [r.input_tokens for r in rows], show_progress=True)


def _predict_rows(model: LengthForest | RunawayMixture, rows: Sequence[Row], X: np.ndarray,
                  quantile: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    caps = [r.max_tokens for r in rows]
    point, high, p_run = model.predict_lengths(X, np.array([m or 0 for m in caps], dtype=np.float64), quantile)
    point = finalize(point, caps)
    return point, np.maximum(point, finalize(np.ceil(high), caps)), p_run


def read_heads(path: str) -> dict[str, list[int]]:
    """``{id: head_ids}`` of a ``bench.prefix`` file."""
    with open(path, encoding="utf-8") as f:
        return {rec["id"]: list(rec["head_ids"]) for rec in map(json.loads, filter(str.strip, f))}


def head_rows(rows: Sequence[Row], heads: dict[str, list[int]], p_run: np.ndarray,
              point: np.ndarray, states: dict[str, np.ndarray] | None = None) -> list[HeadRow]:
    """Re-predictor inputs of ``rows`` (every row needs a head in ``heads`` and a max_tokens);
    ``states``: each row's head states at the checkpoints (``PromptProbe.encode_with_heads``), of
    which a row carries the one of the last checkpoint its head reached, as a worker reports it."""
    missing = [r.id for r in rows if r.id not in heads or r.max_tokens is None]
    if missing:
        raise ValueError(f"{len(missing)} rows have no head tokens or no max_tokens (e.g. {missing[:3]})")

    def state(r: Row) -> np.ndarray | None:
        k = last_checkpoint(len(heads[r.id]))
        return None if states is None or not k else states[r.id][CHECKPOINTS.index(k)]

    return [HeadRow(float(p), float(pt), r.input_tokens, int(r.max_tokens or 0), heads[r.id] or [0], state(r))
            for r, p, pt in zip(rows, p_run, point, strict=True)]


def cmd_train(args: argparse.Namespace) -> int:
    """Train and save a model file; prints a short summary."""
    params = ForestParams(n_estimators=args.n_estimators, max_depth=args.max_depth,
                          min_samples_leaf=args.min_samples_leaf, quantile=args.quantile, seed=args.seed,
                          n_jobs=args.n_jobs, target=args.target)
    rows = (load_request_log(args.from_log, drop_truncated=args.drop_truncated, limit=args.limit)
            if args.from_log else load_jsonl(args.from_jsonl)[: args.limit])
    if not rows:
        print("no rows to train on", file=sys.stderr)
        return 1
    if not 0.0 <= args.holdout < 1.0:
        print("--holdout must be in [0, 1)", file=sys.stderr)
        return 2
    order = np.random.default_rng(args.seed).permutation(len(rows))
    n_hold = int(round(args.holdout * len(rows)))
    hold = [rows[i] for i in order[:n_hold]]
    fit_rows = [rows[i] for i in sorted(order[n_hold:])]
    if not fit_rows:
        print("nothing left to train on after --holdout", file=sys.stderr)
        return 2
    started = time.perf_counter()
    embedder = Embedder(args.embedder, device=args.device, threads=args.threads)
    X = _featurize(fit_rows, embedder)
    heads = read_heads(args.heads) if args.heads else {}
    missing = [r.id for r in fit_rows if r.id not in heads or r.max_tokens is None] if args.heads else []
    if missing:
        print(f"--heads: {len(missing)} rows have no head tokens or no max_tokens (e.g. {missing[:3]})",
              file=sys.stderr)
        return 2
    # form probe: the prompt features; with first tokens (any form given --probe-model), their head
    # states too, from the same forward (the re-predictor learns from them)
    wants_probe = args.form == "probe" or (args.heads and args.probe_model and args.form != "paper")
    probe = _probe(args, args.served_model, args.probe_layer,
                   default_layer if args.form == "probe" else default_state_layer) if wants_probe else None
    Z = H = None
    if probe is not None:
        Z, H = probe.encode_with_heads([r.app_text for r in fit_rows], [r.user_text for r in fit_rows],
                                       [heads[r.id] for r in fit_rows] if args.heads else None)
    z_probe = probe if args.form == "probe" else None  # whose prompt features the model reads
    train = TrainingSet(embedder.name, embedder.dim, X, np.array([r.output_tokens for r in fit_rows]),
                        [r.app_text for r in fit_rows], served_model=args.served_model,
                        max_tokens=np.array([r.max_tokens or 0 for r in fit_rows]),
                        heads=TrainingSet.pack_heads([heads.get(r.id, []) for r in fit_rows]),
                        Z=None if z_probe is None else Z, probe=None if z_probe is None else z_probe.name,
                        H=H, states=None if probe is None else probe.name)
    forest: LengthForest | RunawayMixture
    if args.form == "paper":
        forest = LengthForest.fit(train, params, show_progress=True)
    else:
        form = ProbeMixture if args.form == "probe" else RunawayMixture
        forest = form.fit(train, MixtureParams(quantile=args.quantile, seed=args.seed, n_jobs=args.n_jobs,
                                               user_embedding=args.user_embedding))
        if args.heads:
            assert forest.oob is not None
            forest.repredictor = fit_from_training_set(train, forest.oob, args.quantile, args.seed, min_rows=1)
            if forest.repredictor is None:
                print("too few rows with first tokens to fit the re-predictor", file=sys.stderr)
                return 2
    if hold:
        point, high, _ = _predict_rows(forest, hold, _model_rows(forest, hold, embedder, probe), None)
        m = evaluate_groups(["all"] * len(hold), np.array([r.output_tokens for r in hold]),
                            {"forest": point}, {"forest": high})["overall"]["forest"]
        forest.meta.metrics.update(
            {f"holdout_{k}": float(v) for k, v in m.as_dict().items() if v is not None})
    forest.save(args.out)
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in forest.meta.metrics.items())
    elapsed = time.perf_counter() - started
    reads = embedder.name if z_probe is None else f"{z_probe.name} (and {embedder.name} for the stored rows)"
    if H is not None and probe is not None:
        reads += f", head states of {probe.name}"
    print(f"trained on {len(train)} rows with {reads} in {elapsed:.1f}s: {metrics}")
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model file against every cheap baseline on a JSONL file; prints markdown.

    Baselines (``predictor.evaluate.BASELINES``) are fitted on ``--train`` if given, else on the
    training rows stored in the model file. Every method's prediction is rounded, at least 1, and
    capped by the row's ``max_tokens`` when present. The runaway score of a row is the model's
    P(length >= max_tokens).
    """
    forest = load_length_model(args.model)
    embedder = Embedder(args.embedder or forest.meta.embedder, device=args.device, threads=args.threads)
    if embedder.name != forest.meta.embedder or embedder.dim != forest.meta.dim:
        forest = load_length_model(args.model, embedder.name, embedder.dim)  # raises the mismatch
    rows = load_jsonl(args.file)
    if not rows:
        print("no rows to evaluate", file=sys.stderr)
        return 1
    if args.train:
        base_rows = load_jsonl(args.train)
        b_apps, b_x = [r.app_text for r in base_rows], np.array([r.input_tokens for r in base_rows])
        b_y = np.array([r.output_tokens for r in base_rows])
    elif forest.train is not None and len(forest.train):
        b_apps, b_x, b_y = forest.train.apps, forest.train.input_tokens, forest.train.y
    else:
        print("the model holds no training rows; pass --train FILE for the baselines", file=sys.stderr)
        return 2
    quantile = args.quantile if args.quantile is not None else forest.quantile
    probe = None
    if forest.form == "probe":
        probe = _probe(args, forest.meta.served_model, args.probe_layer or layer_of(forest.meta.probe))
        if probe.name != forest.meta.probe:
            print(f"the model reads the probe {forest.meta.probe!r}, not {probe.name!r}", file=sys.stderr)
            return 2
    inputs: dict[bool, np.ndarray] = {}  # the rows as a probe model / any other form reads them
    heads = read_heads(args.heads) if args.heads else {}
    states = None  # head states, when the re-predictor reads them: one probe forward gives them with Z
    reads_states = getattr(forest.repredictor, "state_model", None) is not None
    learned_from = getattr(forest.repredictor, "states", None)
    state_probe = probe
    if state_probe is None and args.heads and reads_states and learned_from:
        if args.probe_model:
            state_probe = _probe(args, forest.meta.served_model, layer_of(learned_from))
        else:
            print(f"the re-predictor reads head states of {learned_from}; without --probe-model it is scored "
                  "without them", file=sys.stderr)
    if state_probe is not None and args.heads and reads_states:
        Z, H = state_probe.encode_with_heads([r.app_text for r in rows], [r.user_text for r in rows],
                                             [heads.get(r.id, []) for r in rows])
        assert H is not None
        if probe is not None:
            inputs[True] = probe_rows(Z, np.array([r.input_tokens for r in rows]))
        states = {r.id: H[i] for i, r in enumerate(rows)}

    def read_as(model: Any) -> np.ndarray:
        key = model.form == "probe"
        if key not in inputs:
            inputs[key] = _model_rows(model, rows, embedder, probe)
        return inputs[key]

    point, high, score = _predict_rows(forest, rows, read_as(forest), args.quantile)
    extra = {}
    for label, path in (("mixture", args.mixture), ("paper form", args.paper)):
        if path:
            other = load_length_model(path, embedder.name, embedder.dim)
            extra[label] = _predict_rows(other, rows, read_as(other), None)[0]
    name = ("P(length >= max_tokens), the share of trees predicting at least max_tokens" if forest.form == "paper"
            else "the runaway classifier's P(length >= max_tokens)")
    report = yardstick(b_apps, b_x, b_y, rows, point, high, quantile, score, args.runaway_threshold, name,
                       extra=extra)
    print(report.markdown())
    reprediction = None
    if args.heads:
        if forest.repredictor is None:
            print("the model has no re-predictor (train with --heads)", file=sys.stderr)
            return 2
        reprediction = repredict_report(forest.repredictor, rows, heads, score, point,
                                        functools.partial(head_rows, states=states), args.runaway_threshold)
        print("\n" + reprediction.markdown())
    if args.predictions:
        with open(args.file, encoding="utf-8") as f:
            raw = [json.loads(line) for line in f if line.strip()]
        with open(args.predictions, "w", encoding="utf-8") as f:
            for rec, p, h in zip(raw, point, high, strict=True):
                f.write(json.dumps({**rec, "predicted_tokens": int(p), "predicted_high": int(h)}) + "\n")
    if args.json:
        payload: dict[str, Any] = {
            "model": args.model, "eval_file": args.file,
            "baselines_fit_on": args.train or "model training rows",
            "quantile": quantile, "meta": asdict(forest.meta), **report.as_dict(),
            "reprediction": None if reprediction is None else reprediction.as_dict(),
            "results": {g: {m: v.as_dict() for m, v in by.items()} for g, by in report.results.items()},
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model file's metadata as JSON."""
    forest = load_length_model(args.model)
    print(json.dumps(asdict(forest.meta), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m predictor.cli predictor train ...``."""
    parser = argparse.ArgumentParser(prog="magnus")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Cost of a length prediction per request at batch 1 and batch 32 (wall time, repeated).

    .venv/bin/python -m bench.predict_cost [--model MODEL] [--reps 30] [--batches 1 32]

Without ``--model`` it first trains a forest on a synthetic workload (random word sequences for
three applications) so the numbers cover the full path: embedding the user texts (application
texts come from the LRU cache, as in serving), compressing, and the forest with its per-tree
quantile. Every call gets fresh user texts, so nothing is served from a cache that would not be
in production. Also times the two parts separately and the cold-start fallback. A model file of the
probe form (``magnus predictor train --form probe``) is timed with its probe: the served model
(``--probe-model``, default ``default``) run to the recorded depth on every prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from predictor import LengthPredictor, PredictInput, PredictorConfig
from predictor.embedder import Embedder
from predictor.features import FeatureExtractor
from predictor.forest import ForestParams, LengthForest
from predictor.mixture import load_length_model
from predictor.probe import layer_of
from predictor.probe_mixture import probe_inputs
from predictor.repredict import HeadRow
from predictor.trainset import TrainingSet

APPS = [("Translate the following English text into French.", 1.3, 2.0),
        ("Correct the grammar of the following sentence.", 1.0, 1.0),
        ("List three keywords for the following text.", 0.0, 6.0)]
WORDS = ("the cat dog house river mountain quickly slowly green blue happy sad computer network model "
         "language data train city music book window garden coffee rain sun table chair morning evening "
         "friend teacher student write read build").split()


def synthetic(n: int, rng: np.random.Generator) -> tuple[list[PredictInput], np.ndarray]:
    items, ys = [], []
    for i in range(n):
        instruction, a, b = APPS[i % len(APPS)]
        k = int(rng.integers(5, 120))
        items.append(PredictInput(instruction, " ".join(rng.choice(WORDS, size=k)), k, 512))
        ys.append(max(1, round(a * k + b + rng.normal(0, 3))))
    return items, np.array(ys)


def timed(fn: Callable[[list[PredictInput]], object],
          pools: list[list[PredictInput]]) -> tuple[list[float], list[float]]:
    """Wall and process CPU time of ``fn`` on each batch of ``pools`` after a warm-up call."""
    fn(pools[0])
    wall, cpu = [], []
    for batch in pools[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(batch)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def row(name: str, batch: int, times: tuple[list[float], list[float]]) -> str:
    ms = sorted(1000 * t for t in times[0])
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    cpu = statistics.mean(1000 * t for t in times[1])
    return (f"| {name} | {batch} | {statistics.mean(ms):.2f} | {statistics.median(ms):.2f} | {p95:.2f} | "
            f"{statistics.mean(ms) / batch:.2f} | {cpu / batch:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model file to time (default: train one on synthetic data)")
    ap.add_argument("--embedder", default="default")
    ap.add_argument("--train-rows", type=int, default=300)
    ap.add_argument("--n-estimators", type=int, default=100)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for embedding (default: torch's)")
    ap.add_argument("--probe-model", default="default", help="a probe-form model's served model (its spec)")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    embedder = Embedder(args.embedder, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            items, ys = synthetic(args.train_rows, rng)
            X = FeatureExtractor(embedder).transform(
                [i.app_text for i in items], [i.user_text for i in items], [i.input_tokens for i in items],
                show_progress=True)
            ts = TrainingSet(embedder.name, embedder.dim, X, ys, [i.app_text for i in items])
            model = os.path.join(tmp, "bench.joblib")
            LengthForest.fit(ts, ForestParams(n_estimators=args.n_estimators, seed=args.seed)).save(model)
        meta = load_length_model(model).meta
        probe_cfg = {}
        if getattr(meta, "probe", None):
            from service.settings import Settings
            from worker.loader import materialize, resolve

            probe_cfg = {"form": "probe", "served_model": meta.served_model,
                         "probe_model_dir": materialize(resolve(args.probe_model), Settings().cache_dir),
                         "probe_layer": layer_of(meta.probe), "embed_threads": args.threads}
        pred = LengthPredictor(PredictorConfig(embedder=args.embedder, model_path=model, **probe_cfg),
                               embedder=embedder)
        cold = LengthPredictor(PredictorConfig(embedder=args.embedder), embedder=embedder)
    forest = pred._model
    assert forest is not None
    fx = FeatureExtractor(embedder)

    probe = pred.probe

    def features(batch: list[PredictInput]) -> np.ndarray:
        if probe is not None:
            return probe_inputs(probe, [i.app_text for i in batch], [i.user_text for i in batch],
                                [i.input_tokens for i in batch])
        return fx.transform([i.app_text for i in batch], [i.user_text for i in batch],
                            [i.input_tokens for i in batch])

    lines = ["| path | batch | mean ms/call | p50 ms/call | p95 ms/call | mean ms/request | cpu ms/request |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in args.batches:
        pools = [synthetic(b, rng)[0] for _ in range(args.reps + 1)]
        feats = {id(batch): features(batch) for batch in pools}
        lines.append(row(f"predict ({forest.form} model, full path)", b, timed(pred.predict, pools)))
        if probe is not None:
            lines.append(row(f"  probe the prompts ({probe.layer} layers of the served model)", b, timed(
                lambda batch: probe.encode([i.app_text for i in batch], [i.user_text for i in batch]), pools)))
        else:
            lines.append(row("  embed user texts", b, timed(
                lambda batch: embedder.encode([i.user_text for i in batch]), pools)))
        lines.append(row(f"  {forest.form} model + high estimate", b, timed(
            lambda batch: forest.predict_lengths(  # noqa: B023 (called in this iteration)
                feats[id(batch)], np.array([i.max_tokens for i in batch], dtype=float)), pools)))  # noqa: B023
        if forest.repredictor is not None:
            heads = {id(batch): [HeadRow(0.4, 100.0, i.input_tokens, i.max_tokens,
                                         rng.integers(0, 49152, 32).tolist()) for i in batch] for batch in pools}
            lines.append(row("re-predict from 32 first tokens (head features + model)", b, timed(
                lambda batch: forest.repredictor.predict(heads[id(batch)]), pools)))  # noqa: B023
        lines.append(row("predict (cold start fallback)", b, timed(cold.predict, pools)))
    import torch

    threads = args.threads or torch.get_num_threads()
    reads = f"probe {probe.name} (d={probe.dim})" if probe is not None else f"embedder {embedder.name} (d={embedder.dim})"
    print(f"{reads} on cpu, torch threads {threads}, {forest.form} model on {forest.meta.train_size} rows, "
          f"{args.reps} reps after 1 warm-up")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

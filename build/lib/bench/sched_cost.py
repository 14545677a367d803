"""Cost of the scheduling core: time per arrival and per dispatch with N requests waiting.

    .venv/bin/python -m bench.sched_cost [--sizes 100 1000 10000] [--policy magnus]

Workload: prompts log-uniform in [8, 2000] tokens, predicted generation ~ 0.8 x prompt with
noise, max_tokens 2048; memory model and cost model of the paper's setup (ChatGLM-6B, V100 32 GB);
Magnus's estimator is warm (KNN on 500 batches drawn from the cost model). "arrival" times
``on_arrival`` with N waiting; "dispatch" times ``next_batch`` in steady state (one arrival
between dispatches, so the T_p cache misses the batch it changed); "first dispatch" pays T_p
for every waiting batch (cold cache).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from itertools import count

from predictor.types import Prediction
from scheduler.costmodel import CostModel
from scheduler.estimator import BatchRecord, BatchTimeEstimator
from scheduler.factory import make_policy
from scheduler.policy import Policy
from scheduler.request import Request

_ids = count()


def make_request(rng: random.Random, now: float) -> Request:
    prompt = int(math.exp(rng.uniform(math.log(8), math.log(2000))))
    pred = max(1, int(prompt * 0.8 * rng.uniform(0.7, 1.3)))
    return Request(id=f"q{next(_ids)}", prompt_tokens=prompt, max_tokens=2048, arrival=now,
                   prediction=Prediction(pred, pred, "synthetic"))


def warm_estimator(rng: random.Random, cost: CostModel, n: int = 500) -> BatchTimeEstimator:
    est = BatchTimeEstimator(cost, min_samples=n)
    for _ in range(n):
        b, L, G = rng.randint(1, 128), rng.randint(8, 2000), rng.randint(1, 2048)
        est.log(BatchRecord(b, L, G, G, cost(b, L, G)), now=0.0)
    assert est.using_knn
    return est


def build(policy_name: str, rng: random.Random, cost: CostModel) -> Policy:
    params = {"memory": cost.memory_model()}
    if policy_name == "magnus":
        params["estimator"] = warm_estimator(rng, cost)
    return make_policy(policy_name, **params)


def measure(policy_name: str, n_waiting: int, seed: int, reps: int) -> dict[str, float]:
    rng = random.Random(seed)
    cost = CostModel.default()
    policy = build(policy_name, rng, cost)
    now = 0.0
    for _ in range(n_waiting):
        now += 0.001
        policy.on_arrival(make_request(rng, now), now)
    n_batches = len(getattr(getattr(policy, "assembler", None), "batches", {})) or float("nan")

    arrival_s = 0.0
    extra = [make_request(rng, now + 0.001 * (i + 1)) for i in range(reps)]
    for r in extra:  # N (+ up to reps) waiting
        t0 = time.perf_counter()
        policy.on_arrival(r, r.arrival)
        arrival_s += time.perf_counter() - t0
    now = extra[-1].arrival
    for r in extra:  # back to N waiting
        policy.cancel(r.id, now)

    now += 1.0
    t0 = time.perf_counter()
    first = policy.next_batch(0, now)
    first_s = time.perf_counter() - t0
    assert first is not None
    dispatch_s = 0.0
    for _ in range(reps):
        now += 0.01
        policy.on_arrival(make_request(rng, now), now)
        t0 = time.perf_counter()
        batch = policy.next_batch(0, now)
        dispatch_s += time.perf_counter() - t0
        assert batch is not None
    return {
        "batches": n_batches,
        "arrival_us": 1e6 * arrival_s / reps,
        "first_dispatch_us": 1e6 * first_s,
        "dispatch_us": 1e6 * dispatch_s / reps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000])
    ap.add_argument("--policy", default="magnus")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"policy={args.policy}  reps={args.reps}")
    print(f"{'waiting':>8} {'batches':>8} {'arrival us':>11} {'dispatch us':>12} {'first dispatch us':>18}")
    for n in args.sizes:
        m = measure(args.policy, n, args.seed, args.reps)
        print(f"{n:>8} {m['batches']:>8.0f} {m['arrival_us']:>11.1f} {m['dispatch_us']:>12.1f} "
              f"{m['first_dispatch_us']:>18.1f}")


if __name__ == "__main__":
    main()

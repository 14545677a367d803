"""Continual learning of the length predictor at work, through a running server.

    python -m bench.continual --truth TRUTH.jsonl --train-apps machine_translation,grammar_correction,detoxification

Trains a forest on the truth rows of some applications, starts a server (policy glp by default)
with it and a short retraining interval, then streams requests of the *other* applications in
rounds. After each round it waits for the predictor to retrain and reads the request log: the
error of the predictions made in each round shows what the retraining rounds learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai

from service.launcher import start_server


def _retrains(base_url: str) -> float:
    m = re.search(r"^magnus_predictor_retrains (\S+)$", httpx.get(base_url + "/metrics").text, re.M)
    return float(m.group(1)) if m else -1.0


async def _send(v1: str, model: str, rows: list[dict], concurrency: int) -> list[str]:
    sem = asyncio.Semaphore(concurrency)

    async def one(r: dict) -> str:
        async with sem:
            resp = await client.chat.completions.create(
                model=model, temperature=0, max_tokens=r["max_tokens"],
                messages=[{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}])
            return resp.id

    async with openai.AsyncOpenAI(base_url=v1, api_key="x", max_retries=0, timeout=3600) as client:
        return await asyncio.gather(*[one(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True, help="truth JSONL (magnus bench truth output)")
    ap.add_argument("--train-apps", required=True, help="comma-separated apps the first forest is trained on")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=48)
    ap.add_argument("--interval", type=float, default=15.0, help="predictor retraining period (s)")
    ap.add_argument("--policy", default="glp")
    ap.add_argument("--model", default="default")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the per-round results as JSON")
    args = ap.parse_args(argv)

    rows = [json.loads(x) for x in Path(args.truth).read_text().splitlines() if x.strip()]
    train_apps = set(args.train_apps.split(","))
    train = [r for r in rows if r["app"] in train_apps]
    stream = [r for r in rows if r["app"] not in train_apps]
    random.Random(args.seed).shuffle(stream)
    stream = stream[: args.rounds * args.per_round]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        subprocess.run([sys.executable, "-m", "magnus", "predictor", "train", "--from-jsonl",
                        str(t / "train.jsonl"), "--out", str(t / "forest.joblib")], check=True)
        srv = start_server(t / "srv", args.model, policy=args.policy, predictor_model=t / "forest.joblib",
                           predictor_interval_s=args.interval, batch_size=16, max_wait=0.5)
        try:
            name = httpx.get(srv.v1 + "/models").json()["data"][0]["id"]
            for k in range(args.rounds):
                part = stream[k * args.per_round:(k + 1) * args.per_round]
                before = _retrains(srv.base_url)
                ids = asyncio.run(_send(srv.v1, name, part, args.concurrency))
                time.sleep(1.0)  # the request log is written off the request path

                with sqlite3.connect(srv.db_path) as db:
                    got = db.execute(
                        f"SELECT predicted_tokens, completion_tokens, max_tokens FROM requests WHERE id IN "
                        f"({','.join('?' * len(ids))})", ids).fetchall()
                pred = np.array([min(p, m) for p, _, m in got], float)
                true = np.array([c for _, c, _ in got], float)
                err = np.abs(pred - true)
                results.append({"round": k + 1, "requests": len(got), "retrains_before": before,
                                "mae": float(err.mean()),
                                "within_25pct": float(np.mean(err <= 0.25 * np.maximum(true, 1)))})
                print(f"round {k + 1}: {len(got)} requests, MAE {err.mean():.1f} tokens, "
                      f"within 25% {results[-1]['within_25pct']:.0%} (retrains so far {before:.0f})", flush=True)
                deadline = time.time() + 4 * args.interval + 120
                while k + 1 < args.rounds and _retrains(srv.base_url) <= before and time.time() < deadline:
                    time.sleep(2)  # let a retraining round absorb what this round taught
        finally:
            srv.stop()
    print("\n| round | requests | predictor retrains before the round | MAE (tokens) | within 25% |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['round']} | {r['requests']} | {r['retrains_before']:.0f} | {r['mae']:.1f} | {r['within_25pct']:.0%} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

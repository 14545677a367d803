"""Ground truth: run a workload through a server and record the true generation lengths.

Each request goes as an OpenAI chat completion (instruction as the system message, input as the
user message, temperature 0, the request's own ``max_tokens``). Each output line is the input
line plus:

- ``output_tokens``: ``usage.completion_tokens``, the generation length;
- ``prompt_tokens``: ``usage.prompt_tokens``, the whole templated prompt;
- ``input_tokens``: tokens of the user input alone in the default model's tokenizer
  (``bench.workload.tokens``: SmolLM2's, from its GGUF file), no special tokens;
- ``finish_reason``; and ``error`` instead of the four above when the request failed.

``pearson_table`` then gives, per application, Pearson's r between input and output length
(Table I of the paper).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openai
from scipy import stats
from tqdm import tqdm

from bench.workload.records import APPS, chat_messages
from bench.workload.tokens import count_tokens


async def _complete(client: openai.AsyncOpenAI, model: str, row: dict) -> dict:
    try:
        resp = await client.chat.completions.create(
            model=model,
            messages=chat_messages(row["instruction"], row["input"]),
            max_tokens=row["max_tokens"],
            temperature=0,
        )
    except openai.OpenAIError as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if resp.usage is None:
        return {"error": "response without usage"}
    return {
        "output_tokens": resp.usage.completion_tokens,
        "prompt_tokens": resp.usage.prompt_tokens,
        "finish_reason": resp.choices[0].finish_reason,
    }


async def collect_truth(
    client: openai.AsyncOpenAI, model: str, rows: Sequence[dict], concurrency: int = 4, progress: bool = True
) -> list[dict]:
    """The rows with their true lengths, in input order; at most ``concurrency`` requests in flight."""
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(rows), unit="req", disable=not progress)

    async def one(row: dict) -> dict:
        async with gate:
            result = await _complete(client, model, row)
        bar.update()
        return result

    results = await asyncio.gather(*(one(row) for row in rows))
    bar.close()
    input_tokens = count_tokens([row["input"] for row in rows])
    out = []
    for row, result, n_input in zip(rows, results, input_tokens, strict=True):
        extra = {"input_tokens": n_input, **result} if "error" not in result else result
        out.append({**row, **extra})
    return out


def truth_from_log(rows: Sequence[dict], db: Path) -> list[dict]:
    """The workload rows a server already answered, with the lengths from its SQLite request log
    (matched on system text and user text; the latest successful answer wins)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        logged = {
            (app_text, user_text): (inp, comp, prompt, reason)
            for app_text, user_text, inp, comp, prompt, reason in conn.execute(
                "SELECT app_text, user_text, input_tokens, completion_tokens, prompt_tokens, finish_reason "
                "FROM requests WHERE status = 'ok' AND kind = 'chat' ORDER BY finish")
        }
    out = []
    for row in rows:
        hit = logged.get((row["instruction"], row["input"]))
        if hit is not None:
            inp, comp, prompt, reason = hit
            out.append({**row, "input_tokens": inp, "output_tokens": comp, "prompt_tokens": prompt,
                        "finish_reason": reason})
    return out


def pearson_by_app(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per application (and overall): requests, Pearson r of input vs output tokens, means, share cut."""
    ok = [r for r in rows if "output_tokens" in r]
    out: dict[str, dict[str, float]] = {}
    for app in [*APPS, "all"]:
        mine = [r for r in ok if app == "all" or r["app"] == app]
        if not mine:
            continue
        x = np.asarray([r["input_tokens"] for r in mine], dtype=float)
        y = np.asarray([r["output_tokens"] for r in mine], dtype=float)
        constant = len(mine) < 2 or x.std() == 0 or y.std() == 0
        out[app] = {
            "requests": len(mine),
            "pearson_r": float("nan") if constant else float(stats.pearsonr(x, y).statistic),
            "input_mean": float(x.mean()),
            "output_mean": float(y.mean()),
            "cut_by_max_tokens": float(np.mean([r.get("finish_reason") == "length" for r in mine])),
        }
    return out


def pearson_table(rows: Sequence[dict]) -> str:
    """Markdown table of ``pearson_by_app``."""
    lines = [
        "| app | requests | Pearson r (input, output) | mean input | mean output | cut by max_tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for app, s in pearson_by_app(rows).items():
        name = APPS.get(app, app)
        lines.append(
            f"| {name} | {s['requests']} | {s['pearson_r']:.3f} | {s['input_mean']:.1f} "
            f"| {s['output_mean']:.1f} | {100 * s['cut_by_max_tokens']:.0f}% |"
        )
    return "\n".join(lines)

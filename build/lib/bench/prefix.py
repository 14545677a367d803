"""The first generated tokens of each ground-truth row: training data for re-prediction while decoding.

    .venv/bin/python -m bench.prefix bench/results/truth_smollm2_train.jsonl \
        bench/results/prefix_smollm2_train.jsonl [--k 64] [--batch 32] [--model default]

Regenerates, greedily and with the served model's chat prompt (system = instruction, user =
input), the first ``k`` tokens of every row of a truth file and writes ``{"id", "head_ids",
"ended"}`` per row (``ended``: the answer ended within those tokens). Greedy decoding is
deterministic up to batch padding numerics, so the file also reports how many rows that ended
within ``k`` tokens in the truth end at the same position here (the agreement of the two runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.workload.records import chat_messages, read_jsonl
from service.settings import Settings
from worker.loader import load_model, load_tokenizer, materialize, resolve
from worker.text import eos_ids_of


def generate_heads(rows: list[dict], model, tok, k: int, batch: int) -> list[list[int]]:
    """Greedy first ``k`` tokens of each row (cut after an end token), in the rows' order."""
    prompts = [tok.apply_chat_template(chat_messages(r["instruction"], r["input"]), add_generation_prompt=True,
                                       tokenize=False) for r in rows]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    eos = eos_ids_of(model, tok)
    order = sorted(range(len(rows)), key=lambda i: len(ids[i]))
    heads: list[list[int]] = [[] for _ in rows]
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        width = max(len(ids[i]) for i in chunk)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in chunk])
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in chunk])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=k, do_sample=False,
                                 pad_token_id=pad)
        for row, i in enumerate(chunk):
            gen = out[row, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(gen) if t in eos), len(gen))
            heads[i] = gen[:cut]
        print(f"{min(start + batch, len(order))}/{len(order)} rows", file=sys.stderr, flush=True)
    return heads


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("truth", help="truth JSONL (bench truth output: instruction, input, output_tokens)")
    ap.add_argument("out", help="output JSONL: id, head_ids, ended")
    ap.add_argument("--k", type=int, default=64, help="tokens to generate per row")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="default")
    a = ap.parse_args(argv)
    rows = read_jsonl(a.truth)
    local = materialize(resolve(a.model), Settings().cache_dir)
    tok = load_tokenizer(local)
    model = load_model(local, "cpu" if not torch.cuda.is_available() else "cuda", torch.float32)
    t0 = time.perf_counter()
    heads = generate_heads(rows, model, tok, a.k, a.batch)
    eos = eos_ids_of(model, tok)
    short = agree = 0
    with open(a.out, "w", encoding="utf-8") as fh:
        for r, h in zip(rows, heads, strict=True):
            ended = bool(h) and h[-1] in eos
            fh.write(json.dumps({"id": r["id"], "head_ids": h, "ended": ended}) + "\n")
            if r["output_tokens"] < a.k:
                short += 1
                agree += ended and len(h) == r["output_tokens"]
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s; of the {short} rows that ended within {a.k} "
          f"tokens in the truth, {agree} end at the same position here", file=sys.stderr)


if __name__ == "__main__":
    main()

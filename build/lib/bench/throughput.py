"""Tokens per second through the HTTP API versus `model.generate` on the same batches.

    python -m bench.throughput [--sizes 1,8,32] [--max-tokens 64] [--model default]

For each batch size B a VS server with batch size B is started; B distinct chat requests are sent
at once (greedy, same max_tokens) and the valid generated tokens are divided by the wall time of
the whole round. Then the same prompts, left-padded, go through `model.generate` in-process
(greedy, same max_new_tokens) and the valid tokens (up to each row's EOS) are counted the same way.
The overhead ratio is generate tok/s divided by HTTP tok/s (1.0 = no serving overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import openai

from service.launcher import start_server

TOPICS = ["the sea", "a library", "winter", "bread", "trains", "a lighthouse", "bees", "the moon", "rain",
          "chess", "a garden", "mountains", "coffee", "a violin", "snow", "the desert"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": "You are a concise writer."},
             {"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (#{i})."}]
            for i in range(n)]


async def http_round(base_v1: str, model: str, msgs: list, max_tokens: int) -> tuple[int, float]:
    async with openai.AsyncOpenAI(base_url=base_v1, api_key="x", max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[
            client.chat.completions.create(model=model, messages=m, max_tokens=max_tokens, temperature=0)
            for m in msgs
        ])
    return sum(r.usage.completion_tokens for r in rs), time.perf_counter() - t0


def generate_round(model, tok, msgs: list, max_tokens: int) -> tuple[int, float]:
    import torch

    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    gen = out[:, enc["input_ids"].shape[1]:]
    eos = {tok.eos_token_id, model.generation_config.eos_token_id} - {None}
    valid = 0
    for row in gen.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        valid += n
    return valid, dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]

    from service.model import load_model_info
    from service.settings import Settings
    from worker.loader import load_model, pick_dtype

    info = load_model_info(Settings(model=args.model))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in sizes:
            srv = start_server(Path(tmp) / f"b{b}", args.model, policy="vs", batch_size=b, max_wait=5.0)
            try:
                msgs = prompts(b)
                asyncio.run(http_round(srv.v1, info.name, msgs[:1], 4))  # warm-up
                http_tok, http_s = asyncio.run(http_round(srv.v1, info.name, msgs, args.max_tokens))
            finally:
                srv.stop()
            rows.append({"batch": b, "http_tokens": http_tok, "http_s": http_s})
        model = load_model(info.local_dir, info.device, pick_dtype("auto", info.device))
        tok = info.tokenizer
        generate_round(model, tok, prompts(1), 4)  # warm-up
        for row in rows:
            gen_tok, gen_s = generate_round(model, tok, prompts(row["batch"]), args.max_tokens)
            row.update(generate_tokens=gen_tok, generate_s=gen_s)
    print(f"model {info.name}, device {info.device}, max_tokens {args.max_tokens}, greedy\n")
    print("| batch | HTTP tokens | HTTP tok/s | generate tokens | generate tok/s | overhead ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        h, g = r["http_tokens"] / r["http_s"], r["generate_tokens"] / r["generate_s"]
        r.update(http_tps=h, generate_tps=g, ratio=g / h)
        print(f"| {r['batch']} | {r['http_tokens']} | {h:.1f} | {r['generate_tokens']} | {g:.1f} | {g / h:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

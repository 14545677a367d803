"""The decode hot path against the hardware's floor, and a real out-of-memory split on CUDA.

    python -m bench.decode [--model DIR | --random-config config.json] [--device cpu|cuda]
                           [--sizes 1,8,32] [--tokens 128] [--oom-check] [--out FILE.json]

For each batch size B, the static runner (``worker.runner.BatchRunner``, the server's decode
path without HTTP) and ``model.generate`` decode B prompts for exactly ``--tokens`` tokens each
(end tokens suppressed). Reported per B: decode tokens/s of both, and the floor of a memory-bound
decode step, ``(weight bytes + B x mean KV tokens x Delta) / measured bandwidth``, as
memory-bandwidth utilisation (floor / measured step). The bandwidth is measured here (a large
tensor copy reads and writes each byte once). Host time per decode step (the step's wall time
minus the model's forward) is reported at output lengths 1-16 and the last 16 tokens: flat means
no per-step work that grows with the output.

``--extras``: each batch again with every row asking for the OpenAI/vLLM extras at once
(frequency, presence and repetition penalties, temperature + top_p, 5 logprobs): the cost of
``worker/sampling.py``'s processors and logprobs, as tokens/s and host ms per step.

``--random-config``: a randomly initialised model of that config (speed does not depend on the
weights' values), for a machine without the converted weights (e.g. a lent GPU).

``--oom-check`` (CUDA): fills the GPU so that only a small KV budget is left, then runs a batch
that does not fit through the real scheduling core (VS policy) and runner: the batch runs out of
memory for real, is split in halves, and every request is answered (or, alone too large, fails).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from scheduler.contract import WorkBatch, WorkItem
from scheduler.memory import config_dims, delta_from_config
from scheduler.request import SamplingParams
from worker.runner import BatchRunner


def memory_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes/s of a large copy, counting the read and the write (the best of five)."""
    n = int(gib * 2**30 / 4)
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del x, y
    return 2 * n * 4 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(args: argparse.Namespace):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.random_config:
        cfg = AutoConfig.from_pretrained(Path(args.random_config).parent)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype, attn_implementation="sdpa")
    return model.to(args.device).eval(), dtype


class NoEos:
    """A tokenizer stand-in: no token ends a row, so every row decodes exactly max_tokens."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def timed_forward(model) -> dict[str, float]:
    """Accumulates the wall time of the model's forward passes (``acc["t"]``)."""
    acc = {"t": 0.0, "start": 0.0}
    model.register_forward_pre_hook(lambda *_: acc.__setitem__("start", time.perf_counter()))
    model.register_forward_hook(lambda *_: acc.__setitem__("t", acc["t"] + time.perf_counter() - acc["start"]))
    return acc


#: every OpenAI/vLLM sampling extra at once (``--extras``): what a row costs when it asks for all of them
EXTRAS = dict(temperature=0.8, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1,
              logprobs=5)


def run_batch(runner: BatchRunner, size: int, prompt_len: int, tokens: int, vocab: int,
              extras: bool = False) -> dict[str, float]:
    items = [WorkItem(f"r{i}", [(7 * i + j) % (vocab - 1) + 1 for j in range(prompt_len)], tokens,
                      SamplingParams(seed=i, **EXTRAS) if extras else SamplingParams())
             for i in range(size)]
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_tokens(_events) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    out = runner.run(WorkBatch(1, items), emit=on_tokens)
    return {"decode_s": out.stats.decode_s, "prefill_s": out.stats.prefill_s, "steps": len(step_times)}


def bench_sizes(args: argparse.Namespace) -> dict:
    model, dtype = load(args)
    model.generation_config.eos_token_id = None
    cfg = model.config
    delta = delta_from_config(cfg, dtype.itemsize)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = memory_bandwidth(args.device)
    tok = NoEos()
    runner = BatchRunner(model, tok, args.device, int(delta))
    runner.eos_ids = set()
    vocab = cfg.vocab_size
    fwd = timed_forward(model)
    rows = []
    prompt_len = args.prompt_len
    for size in args.sizes:
        run_batch(runner, size, prompt_len, 4, vocab)  # warm-up
        fwd["t"] = 0.0
        r = run_batch(runner, size, prompt_len, args.tokens, vocab)
        host_per_step = (r["decode_s"] + r["prefill_s"] - fwd["t"]) / args.tokens
        extra: dict[str, float] = {}
        if args.extras:  # the same batch, every row with penalties, nucleus sampling and 5 logprobs
            fwd["t"] = 0.0
            e = run_batch(runner, size, prompt_len, args.tokens, vocab, extras=True)
            extra = {"extras_tok_s": size * args.tokens / (e["decode_s"] + e["prefill_s"]),
                     "extras_host_ms_per_step": 1e3 * (e["decode_s"] + e["prefill_s"] - fwd["t"]) / args.tokens}
        ids = torch.tensor([[(7 * i + j) % (vocab - 1) + 1 for j in range(prompt_len)] for i in range(size)],
                           device=args.device)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            sync(args.device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                           pad_token_id=0)
            sync(args.device)
            gen_s = time.perf_counter() - t0
        steps = args.tokens - 1
        step = r["decode_s"] / steps
        floor = (weight_bytes + size * (prompt_len + args.tokens / 2) * delta) / bw
        rows.append({
            "batch": size, "runner_tok_s": size * args.tokens / (r["decode_s"] + r["prefill_s"]),
            "generate_tok_s": size * args.tokens / gen_s, "decode_step_ms": 1e3 * step,
            "floor_step_ms": 1e3 * floor, "mbu": floor / step, "host_ms_per_step": 1e3 * host_per_step, **extra,
        })
        print(json.dumps(rows[-1]), flush=True)
    host = host_time_flat(runner, model, fwd, prompt_len, vocab, args)
    return {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else "cpu", "dtype": str(dtype), "weight_bytes": weight_bytes, "delta": delta,
            "bandwidth_gb_s": bw / 1e9, "layers": config_dims(cfg)["layers"], "rows": rows, "host_time": host}


def host_time_flat(runner, model, fwd, prompt_len: int, vocab: int, args) -> dict[str, float]:
    """Host ms per decode step (wall - forward) over output tokens 1-16 and over 497-512, batch 1."""
    marks: list[tuple[float, float]] = []  # (wall, forward seconds so far) after each step's tokens

    def on_tokens(_events) -> None:
        marks.append((time.perf_counter(), fwd["t"]))

    fwd["t"] = 0.0
    item = WorkItem("h", [(3 * j) % (vocab - 1) + 1 for j in range(prompt_len)], 512, SamplingParams())
    runner.run(WorkBatch(2, [item]), emit=on_tokens)

    def host(a: int, b: int) -> float:
        (w0, f0), (w1, f1) = marks[a], marks[b]
        return 1e3 * ((w1 - w0) - (f1 - f0)) / (b - a)

    return {"host_ms_per_step_tokens_1_16": host(0, 16), "host_ms_per_step_tokens_497_512": host(len(marks) - 17,
                                                                                                   len(marks) - 1)}


def oom_check(args: argparse.Namespace) -> dict:
    """A batch that really runs out of CUDA memory, split by the real core until everyone is answered."""
    from scheduler.core import SchedulerCore
    from scheduler.factory import make_policy
    from scheduler.request import Request

    model, dtype = load(args)
    model.generation_config.eos_token_id = None
    delta = delta_from_config(model.config, dtype.itemsize)
    runner = BatchRunner(model, NoEos(), args.device, int(delta))
    runner.eos_ids = set()
    free, _ = torch.cuda.mem_get_info()
    budget = args.oom_budget_mib * 2**20
    ballast = torch.empty(max(free - budget, 0), dtype=torch.uint8, device=args.device)  # noqa: F841
    policy = make_policy("vs", batch_size=args.oom_batch, max_wait=0.0)
    core = SchedulerCore(policy, [False])
    vocab = model.config.vocab_size
    for i in range(args.oom_batch):
        n = args.oom_prompt_len
        core.add(Request(f"q{i}", n, args.tokens, 0.0, prompt_ids=[(5 * i + j) % (vocab - 1) + 1 for j in range(n)]),
                 0.0)
    oom_batches, sizes, answered, failed, now = 0, [], 0, 0, 0.0
    while core.num_unfinished:
        now += 1.0
        (d,) = core.schedule(now)
        out = runner.run(d.work())
        oom_batches += out.outcome.value == "oom"
        sizes.append((d.batch.size, out.outcome.value))
        up = core.update_from_output(0, out, now + 0.5)
        answered += sum(r.status.finished and r.failure is None for r in up.finished)
        failed += sum(r.failure is not None for r in up.finished)
    return {"kv_budget_mib": args.oom_budget_mib, "batch": args.oom_batch, "oom_batches": oom_batches,
            "answered": answered, "failed": failed, "batches": sizes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a transformers model directory (the converted default model)")
    p.add_argument("--random-config", help="config.json of a model to initialise randomly instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--extras", action="store_true",
                   help="also run each batch with every row asking for penalties, nucleus sampling and 5 logprobs")
    p.add_argument("--oom-check", action="store_true")
    p.add_argument("--oom-batch", type=int, default=64)
    p.add_argument("--oom-budget-mib", type=int, default=200, help="GPU memory left free for the OOM check")
    p.add_argument("--oom-prompt-len", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not (args.model or args.random_config):
        p.error("give --model or --random-config")
    shown = sys.argv[1:] if argv is None else argv
    doc = {"command": "python -m bench.decode " + " ".join(shown), "bench": bench_sizes(args)}
    if args.oom_check:
        torch.cuda.empty_cache()
        doc["oom_check"] = oom_check(args)
        print(json.dumps(doc["oom_check"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

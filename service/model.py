"""What the service knows about the served model: tokenizer, context window, KV bytes per token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from predictor.probe import default_layer, default_state_layer
from scheduler.factory import policy_class
from service.settings import Settings
from worker.loader import load_tokenizer, materialize, pick_device, pick_dtype, resolve
from worker.process import WorkerConfig


@dataclass
class ModelInfo:
    name: str
    local_dir: str
    tokenizer: Any
    config: Any  # transformers PretrainedConfig
    max_model_len: int
    device: str
    dtype_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def vocab_size(self) -> int:
        """Token ids the model can produce: the larger of the embedding rows and the tokenizer's ids."""
        return max(int(getattr(self.config, "vocab_size", 0) or 0), len(self.tokenizer))

    def encode_chat(self, messages: list[dict[str, str]], user_text: str) -> tuple[list[int], int]:
        """Prompt ids of a chat (the tokenizer's chat template) and the user text's token count."""
        return self.chat_ids(messages), len(self.tokenizer.encode(user_text, add_special_tokens=False))

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                 continue_final_message: bool = False, add_special_tokens: bool | None = None) -> list[int]:
        """Prompt ids of a chat; the defaults give what a chat completion feeds the model.

        With a chat template: its text, encoded with no special tokens of the tokenizer's own on top
        unless ``add_special_tokens``. A base model without a template: plain "role: content" lines
        and "assistant: ", encoded with the tokenizer's special tokens unless ``add_special_tokens``
        is False. ``continue_final_message`` leaves the last message open (no generation prompt)."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=bool(add_special_tokens))
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if continue_final_message:
            text = text.removesuffix("\n")
        elif add_generation_prompt:
            text += "assistant: "
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens is not False)

    def encode_text(self, prompt: str, user_text: str) -> tuple[list[int], int]:
        ids = self.tokenizer.encode(prompt) if prompt else []
        return ids, len(self.tokenizer.encode(user_text, add_special_tokens=False))


def load_model_info(settings: Settings) -> ModelInfo:
    """Materialize the weights (GGUF converted and cached once), load tokenizer and config."""
    from transformers import AutoConfig

    src = resolve(settings.model, settings.served_model_name)
    local = materialize(src, settings.cache_dir)
    tok = load_tokenizer(local)
    cfg = AutoConfig.from_pretrained(local)
    ctx = settings.max_model_len or getattr(cfg, "max_position_embeddings", None) or 2048
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    return ModelInfo(name=src.name, local_dir=local, tokenizer=tok, config=cfg, max_model_len=int(ctx),
                     device=device, dtype_bytes=dtype.itemsize)


def worker_mode(runner: str, choice: str) -> str:
    """The worker mode of a policy's runner, with ``--continuous-runner`` applied to continuous ones."""
    if runner == "static" or choice == "auto":
        return runner
    return choice


def worker_configs(settings: Settings, info: ModelInfo) -> list[WorkerConfig]:
    """One worker per CUDA device (or ``num_workers``); on CPU one worker unless configured."""
    if info.device.startswith("cuda"):
        import torch

        n = settings.num_workers or torch.cuda.device_count()
        devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)] if info.device == "cuda" else [info.device] * n
    else:
        devices = ["cpu"] * (settings.num_workers or 1)
    policy = policy_class(settings.policy)
    quant = settings.quantize
    if policy.quantize_bits and quant == "none":
        quant = "4bit" if info.device.startswith("cuda") else "int8"  # bitsandbytes 4-bit needs CUDA
    mode = worker_mode(policy.runner, settings.continuous_runner)
    return [
        WorkerConfig(model_dir=info.local_dir, device=d, dtype=settings.dtype, quantize=quant,
                     threads=settings.worker_threads, mem_cap_bytes=settings.mem_cap_bytes,
                     oom_every=settings.oom_every, step_delay_s=settings.step_delay_s,
                     early_exit=settings.batch_exit == "early", kv_headroom=settings.kv_headroom,
                     mode=mode, state_layer=state_layer(settings, info, policy.needs_prediction, mode))
        for d in devices
    ]


def state_layer(settings: Settings, info: ModelInfo, needs_prediction: bool, mode: str) -> int | None:
    """The decoder layer whose head states an iteration worker reports: for a predictive policy on
    the iteration runner (its re-predictor reads them), ``--predictor-probe-layer`` if given, else
    the probe's default depth for the probe form and ``default_state_layer`` for the others; else
    None (nothing captured)."""
    if not needs_prediction or mode != "iteration" or not settings.head_states:
        return None
    default = default_layer if settings.predictor_form == "probe" else default_state_layer
    return settings.predictor_probe_layer or default(int(info.config.num_hidden_layers))

"""The served model's own view of a prompt: its hidden state after the first layers (TRAIL-style).

A request's chat prompt (system = application text, user = user text, the model's chat template)
runs through the first ``layer`` decoder layers of the served model; the hidden state of its last
token is the feature vector (no final norm: the raw residual stream at that depth). The rest of
the model is dropped at load, so a probe costs about ``layer / num_layers`` of a prefill of the
served model. Measured on the default model (``bench/results/predictor_eval_probe.md``): the
state after 16 of SmolLM2-135M's 30 layers predicts its greedy lengths and runaways better than
sentence embeddings of the texts.

Blocking and thread-safe (one lock around the model): call it from a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np


def default_layer(num_layers: int) -> int:
    """The depth probed when none is configured: just past the middle (16 of 30)."""
    return max(1, min(num_layers, num_layers // 2 + 1))


def layer_of(probe_name: str) -> int:
    """The depth a probe name (``PromptProbe.name``, ``probe:<served model>@<layer>``) records."""
    return int(probe_name.rsplit("@", 1)[1])


def chat_prompt(tokenizer: Any, app_text: str, user_text: str) -> str:
    """The prompt text a chat request of (system = ``app_text``, user = ``user_text``) feeds the model."""
    messages = [{"role": "system", "content": app_text}, {"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"system: {app_text}\nuser: {user_text}\nassistant: "


class PromptProbe:
    """Hidden state of a prompt's last token after ``layer`` layers of a causal LM.

    ``model_dir``: a transformers model directory (the served model's converted copy).
    ``served_model``: the name recorded with the features (a training set or model file built
    with another probe is refused). ``max_tokens``: prompts are cut to their last this many
    tokens. ``threads``: torch intra-op threads while probing (None: torch's default).
    """

    def __init__(self, model_dir: str, served_model: str, layer: int | None = None, device: str = "cpu",
                 batch_size: int = 8, max_tokens: int = 1024, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        n = int(base.config.num_hidden_layers)
        self.layer = default_layer(n) if layer is None else int(layer)
        if not 1 <= self.layer <= n:
            raise ValueError(f"probe layer must be in 1..{n}, got {self.layer}")
        layers = getattr(base, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and hasattr(base, "norm"):
            base.layers = layers[: self.layer]  # the deeper layers are never run: drop their weights
            base.norm = torch.nn.Identity()
            base.config.num_hidden_layers = self.layer
        self.model = base.to(device).eval()
        self.device = torch.device(device)
        self.dim = int(base.config.hidden_size)
        self.name = f"probe:{served_model}@{self.layer}"
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.threads = threads
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self._lock = threading.Lock()

    def prompt_ids(self, app_text: str, user_text: str) -> list[int]:
        ids = self.tok.encode(chat_prompt(self.tok, app_text, user_text), add_special_tokens=False)
        return ids[-self.max_tokens:] or [self.pad_id]

    def encode(self, app_texts: Sequence[str], user_texts: Sequence[str]) -> np.ndarray:
        """Features ``(n, dim)`` float32, one row per (application text, user text) pair."""
        import torch

        if len(app_texts) != len(user_texts):
            raise ValueError("app_texts and user_texts must have the same length")
        seqs = [self.prompt_ids(a or "", u or "") for a, u in zip(app_texts, user_texts, strict=True)]
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths: little padding
        with self._lock:
            previous = torch.get_num_threads()
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            try:
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    out[chunk] = self._run([seqs[i] for i in chunk])
            finally:
                torch.set_num_threads(previous)
        return out

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every row's last token sits in the last column
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        with torch.inference_mode():
            hs = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                            output_hidden_states=True, use_cache=False).hidden_states
        return hs[self.layer][:, -1, :].float().cpu().numpy()

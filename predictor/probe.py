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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from predictor.types import CHECKPOINTS


def default_layer(num_layers: int) -> int:
    """The depth probed when none is configured: just past the middle (16 of 30)."""
    return max(1, min(num_layers, num_layers // 2 + 1))


def default_state_layer(num_layers: int) -> int:
    """The depth whose head states the re-predictor of the mixture and paper forms reads when none
    is configured: two thirds deep (20 of 30). On the default model's document split it ranked
    runaways better than 16, 24 or 30 (``bench/results/predictor_eval_mixture_states.md``). The
    probe form reads its probe's layer: the probe's one forward gives the training rows' states."""
    return max(1, min(num_layers, round(num_layers * 2 / 3)))


def probe_name(served_model: str, layer: int) -> str:
    """The name of layer ``layer`` of ``served_model`` as a feature source (``PromptProbe.name``;
    head states of that layer, reported by a worker, carry the same name)."""
    return f"probe:{served_model}@{layer}"


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
                 batch_size: int = 8, max_tokens: int = 1024, threads: int | None = None,
                 default: Callable[[int], int] = default_layer) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        n = int(base.config.num_hidden_layers)
        self.layer = default(n) if layer is None else int(layer)
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
        self.name = probe_name(served_model, self.layer)
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
        return self.encode_with_heads(app_texts, user_texts, None)[0]

    def encode_with_heads(self, app_texts: Sequence[str], user_texts: Sequence[str],
                          heads: Sequence[Sequence[int]] | None,
                          checkpoints: Sequence[int] = CHECKPOINTS) -> tuple[np.ndarray, np.ndarray | None]:
        """``(Z, H)``: the prompts' features as ``encode`` gives them and, when the requests' first
        generated tokens ``heads`` are given, their head states ``(n, len(checkpoints), dim)``
        (``head_state_means``; NaN where a head is too short for a checkpoint), from one forward."""
        import torch

        if len(app_texts) != len(user_texts) or (heads is not None and len(heads) != len(app_texts)):
            raise ValueError("app_texts, user_texts (and heads) must have the same length")
        prompts = [self.prompt_ids(a or "", u or "") for a, u in zip(app_texts, user_texts, strict=True)]
        tails = [[] for _ in prompts] if heads is None else [list(h)[:checkpoints[-1] - 1] for h in heads]
        Z = np.zeros((len(prompts), self.dim), dtype=np.float32)
        H = None if heads is None else np.full((len(prompts), len(checkpoints), self.dim), np.nan, dtype=np.float32)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(tails[i]))  # little padding
        with self._lock:
            previous = torch.get_num_threads()
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            try:
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    states = self._run([prompts[i] + tails[i] for i in chunk])
                    for j, i in enumerate(chunk):
                        n, t = len(prompts[i]), len(tails[i])
                        row = states[j, states.shape[1] - n - t:]  # the row's tokens, padding cut
                        Z[i] = row[n - 1].numpy()
                        if H is not None:
                            H[i] = head_state_means(row[n - 1:], len(tails[i]) + 1, checkpoints)
            finally:
                torch.set_num_threads(previous)
        return Z, H

    def _run(self, seqs: list[list[int]]) -> Any:
        """Hidden states ``(rows, width, dim)`` (float32 torch, CPU) after ``layer`` layers, left-padded."""
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
        return hs[self.layer].float().cpu()


def head_state_means(states: Any, known: int, checkpoints: Sequence[int] = CHECKPOINTS) -> np.ndarray:
    """The head state of each re-prediction checkpoint ``k`` (``checkpoints``): the mean of the probe
    layer's states from the prompt's last token through generated token ``k - 1``, i.e. every state
    the model had computed when it had generated ``k`` tokens. ``states``: ``(known, dim)``, the
    prompt's last token first; a checkpoint past ``known`` states is NaN."""
    import torch

    csum = torch.cumsum(torch.as_tensor(states, dtype=torch.float32), dim=0)
    out = np.full((len(checkpoints), csum.shape[1]), np.nan, dtype=np.float32)
    for c, k in enumerate(checkpoints):
        if k <= known:
            out[c] = (csum[k - 1] / k).numpy()
    return out

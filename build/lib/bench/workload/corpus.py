"""A corpus of real text or code cut into units, sampled to a target length in tokens.

A document (a man page, a docstring, a source file) is an ordered list of units (sentences,
catalog messages, functions). A sample is a run of consecutive units of one document whose
token count comes close to the target, so long inputs stay coherent text. Every document comes
with the name of its *source* (``man:man1/ls.1``, ``catalog:coreutils``, ``license:GPL-3``,
``python:json/decoder.py``); several documents may share one (the docstrings of a file), and a
sample reports the source it was cut from, so a train/test split can keep sources apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: A document: its units in order, each with the separator written before it after another unit.
Document = list[tuple[str, str]]
#: A document with the name of the source it was read from.
Sourced = tuple[str, Document]

#: A sample may exceed its target by this factor.
OVERSHOOT = 1.25


@dataclass
class Corpus:
    """Units of many documents with their token counts."""

    name: str
    texts: list[str]
    seps: list[str]
    doc: np.ndarray  # document index of each unit
    sources: list[str]  # source name of each document
    tokens: np.ndarray  # tokens of each unit
    remaining: np.ndarray  # tokens from each unit to the end of its document
    used: set[int] = field(default_factory=set)  # start units already sampled

    @classmethod
    def from_documents(
        cls, name: str, sourced: Sequence[Sourced], count: Callable[[Sequence[str]], list[int]]
    ) -> Corpus:
        """Build a corpus of (source, document) pairs; ``count`` gives the token count of each text."""
        sourced = [(source, d) for source, d in sourced if d]
        if not sourced:
            raise ValueError(f"corpus {name!r} has no documents")
        names, documents = [source for source, _ in sourced], [d for _, d in sourced]
        seps = [sep for d in documents for sep, _ in d]
        texts = [text for d in documents for _, text in d]
        doc = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
        tokens = np.asarray(count(texts), dtype=np.int64)
        remaining = np.empty_like(tokens)
        start = 0
        for d in documents:
            end = start + len(d)
            remaining[start:end] = np.cumsum(tokens[start:end][::-1])[::-1]
            start = end
        return cls(name, texts, seps, doc, names, tokens, remaining)

    def __len__(self) -> int:
        return len(self.texts)

    def sample(self, target: int, rng: np.random.Generator) -> str:
        """The text of ``draw``."""
        return self.draw(target, rng)[0]

    def draw(self, target: int, rng: np.random.Generator) -> tuple[str, str]:
        """Consecutive units of one document of about ``target`` tokens (units at most 1.25x),
        and the name of that document's source.

        Starts at a random unit not used before that fits the target and, where possible, has
        enough text after it; short targets thus get short units, long ones runs of units.
        """
        limit = OVERSHOOT * target
        fits = self.tokens <= limit
        fresh = np.ones(len(self), dtype=bool)
        fresh[list(self.used)] = False
        for mask in (fits & fresh & (self.remaining >= 0.8 * target), fits & fresh, fits):
            candidates = np.flatnonzero(mask)
            if candidates.size:
                break
        else:
            candidates = np.array([int(np.argmin(self.tokens))])
        i = int(rng.choice(candidates))
        self.used.add(i)
        parts, total = [self.texts[i]], int(self.tokens[i])
        j = i + 1
        while j < len(self) and self.doc[j] == self.doc[i] and total < target:
            if total + self.tokens[j] > limit:
                break
            parts.extend((self.seps[j], self.texts[j]))
            total += int(self.tokens[j])
            j += 1
        return "".join(parts), self.sources[int(self.doc[i])]

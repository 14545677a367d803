"""Benchmark workloads: the six applications of the paper and the JSONL request format.

One JSON object per line::

    {"id": "mt-0007", "app": "machine_translation", "instruction": "Translate the following text
     from German to English.", "input": "...", "max_tokens": 256, "source": "man:man1/tar.1"}

with an optional ``"arrival"`` (seconds from the start of a trace) and ``"source"`` (the document
the input was cut from, which the train/test split keeps on one side). The instruction is the
application-level text (sent as the system message), the input the user-level text (the user
message). ``bench.workload.builder`` makes these files from text and code shipped on the machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

#: Applications in the paper's order, with the paper's abbreviations.
APPS = {
    "machine_translation": "MT",
    "grammar_correction": "GC",
    "detoxification": "TD",
    "code_translation": "CT",
    "bug_fixing": "BF",
    "code_commenting": "CC",
}
LANGUAGES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "ru": "Russian",
    "zh": "Chinese",
}
CODE_TARGETS = ("JavaScript", "C", "Go", "Java")

INSTRUCTIONS = {
    "grammar_correction": "Correct the grammar mistakes in the following text.",
    "detoxification": "Rewrite the following rude message politely, keeping its meaning.",
    "bug_fixing": "Fix the bug in the following Python code.",
    "code_commenting": "Add comments to the following Python code.",
}


def translation_instruction(src: str, tgt: str) -> str:
    """Instruction of machine translation from language code ``src`` to ``tgt``."""
    return f"Translate the following text from {LANGUAGES[src]} to {LANGUAGES[tgt]}."


def code_translation_instruction(target: str) -> str:
    """Instruction of code translation from Python to ``target``."""
    return f"Translate the following Python code to {target}."


@dataclass
class Request:
    """One benchmark request."""

    id: str
    app: str  # a key of APPS
    instruction: str  # application-level text: the system message
    input: str  # user-level text: the user message
    max_tokens: int  # the request's generation limit
    arrival: float | None = None  # seconds from the start of a trace, when the workload is a trace
    source: str | None = None  # the source document of the input (man page, catalog, file), if known

    def to_dict(self) -> dict:
        """The JSON object of this request (without ``arrival`` or ``source`` when it has none)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("arrival", "source")}


def chat_messages(instruction: str, user_input: str) -> list[dict[str, str]]:
    """The chat messages of a request: the instruction as system message, the input as user message."""
    return [{"role": "system", "content": instruction}, {"role": "user", "content": user_input}]


def read_jsonl(path: str | Path) -> list[dict]:
    """All JSON objects of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write JSON objects one per line (UTF-8, non-ASCII kept)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_requests(path: str | Path) -> list[Request]:
    """The requests of a workload file (extra fields, such as ground-truth lengths, are ignored)."""
    fields = Request.__dataclass_fields__
    return [Request(**{k: v for k, v in row.items() if k in fields}) for row in read_jsonl(path)]

"""Build the six-application workload from real text and code on this machine.

For each request: draw a target input length (log-uniform between the task's bounds, in tokens of
the default model), take a run of consecutive units of that length from a real corpus, turn it
into the application's input (inject grammar errors, rude phrasing or a bug, strip comments),
and set ``max_tokens`` from the expected output length:

    max_tokens = min(512, ceil(1.3 * expected) + 16)

``expected`` is the token count of the text a correct answer reproduces where the builder knows
it (the sentence before corruption, the polite text, the code before the bug), the code before
its comments were stripped (at least 1.2x the input) for commenting, and the input length times a
ratio for translation: measured on the machine's gettext catalogs (human translations) for
natural languages, an estimate per target language for code. The upper input bound of a task is
the length whose expected output is 380 tokens (so ``max_tokens`` stays within the cap), at
most 1,000.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.workload import corrupt, sources
from bench.workload.corpus import Corpus, Document
from bench.workload.records import (
    APPS,
    CODE_TARGETS,
    INSTRUCTIONS,
    Request,
    code_translation_instruction,
    translation_instruction,
)
from bench.workload.tokens import count_tokens

MAX_TOKENS_CAP = 512
OUTPUT_MARGIN = 1.3  # max_tokens over the expected output length
OUTPUT_SLACK = 16
EXPECTED_OUTPUT_MAX = 380
INPUT_MAX = 1000
#: Output tokens per Python input token; no parallel code ships here, so these are estimates.
CODE_RATIOS = {"JavaScript": 1.1, "C": 1.6, "Go": 1.3, "Java": 1.4}
#: Smallest target input (tokens) per application.
INPUT_MIN = {
    "machine_translation": 3,
    "grammar_correction": 6,
    "detoxification": 6,
    "code_translation": 12,
    "bug_fixing": 12,
    "code_commenting": 12,
}

#: Turns a real text into (input, expected output tokens); None rejects the text.
Transform = Callable[[str, np.random.Generator], tuple[str, int] | None]


@dataclass
class BuildConfig:
    """What to read and how many requests to make."""

    n: int = 2400  # requests in all, split evenly over the six applications
    seed: int = 0
    train_fraction: float = 0.25  # the paper trains on 2,500 of 10,000 requests per task
    english_man_pages: int = 300  # evenly spaced over the ~3,000 non-gcloud English pages
    translated_man_pages: int = 0  # per language; 0 = all
    stdlib_files: int = 0  # 0 = all standard library modules
    catalogs: int = 0  # gettext catalogs per language; 0 = all
    languages: tuple[str, ...] = ("fr", "de", "es", "ru", "zh")

    def __post_init__(self) -> None:
        if self.n < len(APPS):
            raise ValueError(f"n must be at least {len(APPS)}")
        if not 0 < self.train_fraction < 1:
            raise ValueError("train_fraction must be in (0, 1)")


@dataclass
class Task:
    """One application direction: where its text comes from and how it becomes an input."""

    app: str
    instruction: str
    corpus: Corpus
    transform: Transform
    output_ratio: float  # expected output tokens per input token, to bound the input length
    low: int
    high: int = field(init=False)

    def __post_init__(self) -> None:
        self.high = int(min(INPUT_MAX, EXPECTED_OUTPUT_MAX / self.output_ratio))


def max_tokens_for(expected: int) -> int:
    """The generation limit of a request whose answer is expected to be ``expected`` tokens."""
    return min(MAX_TOKENS_CAP, math.ceil(OUTPUT_MARGIN * expected) + OUTPUT_SLACK)


class _Counter:
    """Token counts with a memo (the corpora share many units)."""

    def __init__(self) -> None:
        self.memo: dict[str, int] = {}

    def __call__(self, texts: Sequence[str]) -> list[int]:
        new = list(dict.fromkeys(t for t in texts if t not in self.memo))
        self.memo.update(zip(new, count_tokens(new), strict=True))
        return [self.memo[t] for t in texts]

    def one(self, text: str) -> int:
        return self([text])[0]


def _singletons(texts: Sequence[str]) -> list[Document]:
    return [[("", t)] for t in texts]


def build_tasks(config: BuildConfig, count: _Counter) -> dict[str, list[Task]]:
    """The tasks of every application, with their corpora loaded."""
    english_man = sources.man_documents(None, config.english_man_pages)
    files = sources.stdlib_files(config.stdlib_files)
    functions, docstrings = sources.python_documents(files)
    prose = Corpus.from_documents("english-prose", english_man + docstrings + sources.license_documents(), count)
    code = Corpus.from_documents("python-functions", functions, count)

    pairs = {lang: sources.catalog_pairs(lang, config.catalogs) for lang in config.languages}
    english_messages = sorted({en for lang_pairs in pairs.values() for en, _ in lang_pairs})
    english = Corpus.from_documents("english-mt", english_man + _singletons(english_messages), count)

    def keep(text: str, rng: np.random.Generator) -> tuple[str, int]:
        return text, count.one(text)

    tasks: dict[str, list[Task]] = {app: [] for app in APPS}
    low = INPUT_MIN["machine_translation"]
    for lang in config.languages:
        ens, trs = zip(*pairs[lang], strict=True)
        ratio = sum(count(trs)) / sum(count(ens))  # target-language tokens per English token
        foreign = Corpus.from_documents(
            f"{lang}-mt",
            sources.man_documents(lang, config.translated_man_pages) + _singletons(trs),
            count,
        )
        to_lang = _scaled(keep, ratio)
        to_en = _scaled(keep, 1 / ratio)
        tasks["machine_translation"].append(
            Task("machine_translation", translation_instruction("en", lang), english, to_lang, ratio, low)
        )
        tasks["machine_translation"].append(
            Task("machine_translation", translation_instruction(lang, "en"), foreign, to_en, 1 / ratio, low)
        )

    def grammar(text: str, rng: np.random.Generator) -> tuple[str, int] | None:
        wrong, n = corrupt.inject_grammar_errors(text, rng)
        return (wrong, count.one(text)) if n and wrong != text else None

    def rude(text: str, rng: np.random.Generator) -> tuple[str, int] | None:
        return corrupt.make_rude(text, rng), count.one(text)

    def buggy(text: str, rng: np.random.Generator) -> tuple[str, int] | None:
        result = corrupt.inject_bug(text, rng)
        return (result[0], count.one(text)) if result else None

    def uncommented(text: str, rng: np.random.Generator) -> tuple[str, int] | None:
        bare = corrupt.strip_comments(text)
        if not bare or len(bare.splitlines()) < 2:
            return None
        return bare, max(count.one(text), math.ceil(1.2 * count.one(bare)))

    for app, transform, ratio, corpus in (
        ("grammar_correction", grammar, 1.0, prose),
        ("detoxification", rude, 1.0, prose),
        ("bug_fixing", buggy, 1.0, code),
        ("code_commenting", uncommented, 1.4, code),
    ):
        tasks[app].append(Task(app, INSTRUCTIONS[app], corpus, transform, ratio, INPUT_MIN[app]))
    for target in CODE_TARGETS:
        ratio, instruction = CODE_RATIOS[target], code_translation_instruction(target)
        tasks["code_translation"].append(
            Task("code_translation", instruction, code, _scaled(keep, ratio), ratio, INPUT_MIN["code_translation"])
        )
    return tasks


def _scaled(transform: Transform, ratio: float) -> Transform:
    def scaled(text: str, rng: np.random.Generator) -> tuple[str, int] | None:
        result = transform(text, rng)
        return (result[0], math.ceil(ratio * result[1])) if result else None

    return scaled


def make_request(task: Task, rid: str, rng: np.random.Generator, seen: set[str], tries: int = 20) -> Request:
    """One request of a task, its input drawn at a log-uniform target length and not in ``seen``."""
    for _ in range(tries):
        target = round(math.exp(rng.uniform(math.log(task.low), math.log(task.high))))
        made = task.transform(task.corpus.sample(target, rng), rng)
        if made is not None and made[0] not in seen:
            text, expected = made
            seen.add(text)
            return Request(rid, task.app, task.instruction, text, max_tokens_for(expected))
    raise RuntimeError(f"no usable input for {task.instruction!r} after {tries} tries")


@dataclass
class Workload:
    """All requests in a shuffled order, and its train and test subsequences."""

    all: list[Request]
    train: list[Request]
    test: list[Request]
    tasks: list[dict] = field(default_factory=list)  # instruction, output ratio and input bounds


def build_workload(config: BuildConfig) -> Workload:
    """Requests of the six applications; the train/test split is stratified by application."""
    rng = np.random.default_rng(config.seed)
    tasks = build_tasks(config, _Counter())
    per_app, extra = divmod(config.n, len(APPS))
    made: list[Request] = []
    train_ids: set[str] = set()
    seen: set[str] = set()
    for k, (app, abbrev) in enumerate(APPS.items()):
        n_app = per_app + (k < extra)
        cycle = tasks[app]  # directions of an application take turns
        of_app = [make_request(cycle[i % len(cycle)], f"{abbrev.lower()}-{i:04d}", rng, seen) for i in range(n_app)]
        n_train = round(config.train_fraction * n_app)
        train_ids.update(of_app[i].id for i in rng.permutation(n_app)[:n_train])
        made += of_app
    everything = [made[i] for i in rng.permutation(len(made))]
    return Workload(
        everything,
        [r for r in everything if r.id in train_ids],
        [r for r in everything if r.id not in train_ids],
        [
            {"app": t.app, "instruction": t.instruction, "output_ratio": round(t.output_ratio, 3),
             "input_low": t.low, "input_high": t.high}
            for app_tasks in tasks.values()
            for t in app_tasks
        ],
    )


def workload_stats(requests: Sequence[Request]) -> dict[str, dict[str, float]]:
    """Per application: requests, input tokens (min/median/max) and median max_tokens."""
    tokens = np.asarray(count_tokens([r.input for r in requests]))
    apps = np.asarray([r.app for r in requests])
    limits = np.asarray([r.max_tokens for r in requests])
    out: dict[str, dict[str, float]] = {}
    for app in [*APPS, "all"]:
        mask = apps == app if app != "all" else np.ones(len(requests), dtype=bool)
        if mask.any():
            t = tokens[mask]
            out[app] = {
                "requests": int(mask.sum()),
                "input_min": int(t.min()),
                "input_median": float(np.median(t)),
                "input_max": int(t.max()),
                "max_tokens_median": float(np.median(limits[mask])),
            }
    return out

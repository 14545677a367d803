"""Build the six-application workload from real text and code on this machine.

For each request: draw a target input length (log-uniform between the task's bounds, in tokens of
the default model), take a run of consecutive units of that length from one source document of a
real corpus, turn it into the application's input (inject grammar errors, rude phrasing or a bug,
strip comments), and send it with its application's fixed ``max_tokens`` (``MAX_TOKENS``), as an
application does: the limit never depends on the answer.

The expected answer length bounds only which inputs an application is given. It is the input
length times the task's output ratio: 1 where a correct answer reproduces the input (grammar
correction, detoxification, bug fixing), 1.4 for commenting, for translation a ratio measured on
the machine's gettext catalogs (human translations) for natural languages and an estimate per
target language for code. A task's longest input is the one whose expected output, with a 1.3x
margin and 16 tokens of slack, just fits the application's limit (``(max_tokens - 16) / 1.3``
tokens), at most 1,000: a correct answer fits, and one that reaches ``max_tokens`` ran away.

The train/test split is by source document (a man page with its translations, a catalog, a
license file, a Python file): every request records its ``source``, and no source has requests
on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.workload import corrupt, sources
from bench.workload.corpus import Corpus
from bench.workload.records import (
    APPS,
    CODE_TARGETS,
    INSTRUCTIONS,
    Request,
    code_translation_instruction,
    translation_instruction,
)
from bench.workload.tokens import count_tokens

#: The generation limit each application sends. Grammar correction and detoxification rewrite a
#: sentence or a paragraph and machine translation translates one, so 256 tokens; the code
#: applications work on whole functions, whose translation or commented version is longer, so 512.
MAX_TOKENS = {
    "machine_translation": 256,
    "grammar_correction": 256,
    "detoxification": 256,
    "code_translation": 512,
    "bug_fixing": 512,
    "code_commenting": 512,
}
MAX_TOKENS_CAP = max(MAX_TOKENS.values())
OUTPUT_MARGIN = 1.3  # a task's longest expected output is (max_tokens - slack) / margin
OUTPUT_SLACK = 16
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

#: Turns a real text into an application's input; None rejects the text.
Transform = Callable[[str, np.random.Generator], str | None]


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
        self.high = int(min(INPUT_MAX, longest_expected(self.app) / self.output_ratio))


def max_tokens_for(app: str) -> int:
    """The generation limit of every request of application ``app``."""
    return MAX_TOKENS[app]


def longest_expected(app: str) -> float:
    """The longest expected answer (tokens) an application's inputs are chosen for."""
    return (MAX_TOKENS[app] - OUTPUT_SLACK) / OUTPUT_MARGIN


class _Counter:
    """Token counts with a memo (the corpora share many units)."""

    def __init__(self) -> None:
        self.memo: dict[str, int] = {}

    def __call__(self, texts: Sequence[str]) -> list[int]:
        new = list(dict.fromkeys(t for t in texts if t not in self.memo))
        self.memo.update(zip(new, count_tokens(new), strict=True))
        return [self.memo[t] for t in texts]


def build_tasks(config: BuildConfig, count: _Counter) -> dict[str, list[Task]]:
    """The tasks of every application, with their corpora loaded."""
    english_man = sources.man_documents(None, config.english_man_pages)
    files = sources.stdlib_files(config.stdlib_files)
    functions, docstrings = sources.python_documents(files)
    prose = Corpus.from_documents("english-prose", english_man + docstrings + sources.license_documents(), count)
    code = Corpus.from_documents("python-functions", functions, count)

    pairs = {lang: sources.catalog_pairs(lang, config.catalogs) for lang in config.languages}
    # a message and all its translations share one source: the first catalog holding it
    catalog: dict[str, str] = {}
    for lang_pairs in pairs.values():
        for en, _, domain in lang_pairs:
            catalog[en] = min(catalog.get(en, f"catalog:{domain}"), f"catalog:{domain}")
    english_messages = sorted(catalog)
    english = Corpus.from_documents(
        "english-mt", english_man + [(catalog[en], [("", en)]) for en in english_messages], count
    )

    def keep(text: str, rng: np.random.Generator) -> str:
        return text

    tasks: dict[str, list[Task]] = {app: [] for app in APPS}
    low = INPUT_MIN["machine_translation"]
    for lang in config.languages:
        ens, trs, _ = zip(*pairs[lang], strict=True)
        ratio = sum(count(trs)) / sum(count(ens))  # target-language tokens per English token
        foreign = Corpus.from_documents(
            f"{lang}-mt",
            sources.man_documents(lang, config.translated_man_pages)
            + [(catalog[en], [("", tr)]) for en, tr in zip(ens, trs, strict=True)],
            count,
        )
        tasks["machine_translation"].append(
            Task("machine_translation", translation_instruction("en", lang), english, keep, ratio, low)
        )
        tasks["machine_translation"].append(
            Task("machine_translation", translation_instruction(lang, "en"), foreign, keep, 1 / ratio, low)
        )

    def grammar(text: str, rng: np.random.Generator) -> str | None:
        wrong, n = corrupt.inject_grammar_errors(text, rng)
        return wrong if n and wrong != text else None

    def rude(text: str, rng: np.random.Generator) -> str | None:
        return corrupt.make_rude(text, rng)

    def buggy(text: str, rng: np.random.Generator) -> str | None:
        result = corrupt.inject_bug(text, rng)
        return result[0] if result else None

    def uncommented(text: str, rng: np.random.Generator) -> str | None:
        bare = corrupt.strip_comments(text)
        return bare if bare and len(bare.splitlines()) >= 2 else None

    # output ratios bound the inputs (Task.high); commented code is estimated at 1.4x the bare code
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
            Task("code_translation", instruction, code, keep, ratio, INPUT_MIN["code_translation"])
        )
    return tasks


def make_request(task: Task, rid: str, rng: np.random.Generator, seen: set[str], tries: int = 20) -> Request:
    """One request of a task, its input drawn at a log-uniform target length and not in ``seen``."""
    for _ in range(tries):
        target = round(math.exp(rng.uniform(math.log(task.low), math.log(task.high))))
        text, source = task.corpus.draw(target, rng)
        made = task.transform(text, rng)
        if made is not None and made not in seen:
            seen.add(made)
            return Request(rid, task.app, task.instruction, made, max_tokens_for(task.app), source=source)
    raise RuntimeError(f"no usable input for {task.instruction!r} after {tries} tries")


@dataclass
class Workload:
    """All requests in a shuffled order, and its train and test subsequences."""

    all: list[Request]
    train: list[Request]
    test: list[Request]
    tasks: list[dict] = field(default_factory=list)  # instruction, output ratio and input bounds


def split_by_source(
    requests: Sequence[Request], fraction: float, rng: np.random.Generator, tries: int = 32
) -> set[str]:
    """Sources of the training side: whole source documents, stratified by application.

    Sources are taken in random order; each joins the training side when that brings the training
    requests of every application closer (in squared distance) to ``fraction`` of its requests.
    Of ``tries`` random orders the closest split is kept.
    """
    apps = {app: k for k, app in enumerate(APPS)}
    counts: dict[str, np.ndarray] = {}
    for r in requests:
        counts.setdefault(str(r.source), np.zeros(len(apps)))[apps[r.app]] += 1
    names = sorted(counts)
    per_source = np.array([counts[name] for name in names]).reshape(len(names), len(apps))
    target = fraction * per_source.sum(axis=0)
    best: tuple[float, set[str]] = (np.inf, set())
    for _ in range(tries):
        taken, chosen = np.zeros(len(apps)), set()
        for i in rng.permutation(len(names)):
            if np.sum((taken + per_source[i] - target) ** 2) < np.sum((taken - target) ** 2):
                taken += per_source[i]
                chosen.add(names[i])
        error = float(np.sum((taken - target) ** 2))
        if error < best[0]:
            best = (error, chosen)
    return best[1]


def build_workload(config: BuildConfig) -> Workload:
    """Requests of the six applications, split into train and test by source document."""
    rng = np.random.default_rng(config.seed)
    tasks = build_tasks(config, _Counter())
    per_app, extra = divmod(config.n, len(APPS))
    made: list[Request] = []
    seen: set[str] = set()
    for k, (app, abbrev) in enumerate(APPS.items()):
        n_app = per_app + (k < extra)
        cycle = tasks[app]  # directions of an application take turns
        made += [make_request(cycle[i % len(cycle)], f"{abbrev.lower()}-{i:04d}", rng, seen) for i in range(n_app)]
    train_sources = split_by_source(made, config.train_fraction, rng)
    everything = [made[i] for i in rng.permutation(len(made))]
    return Workload(
        everything,
        [r for r in everything if r.source in train_sources],
        [r for r in everything if r.source not in train_sources],
        [
            {"app": t.app, "instruction": t.instruction, "output_ratio": round(t.output_ratio, 3),
             "input_low": t.low, "input_high": t.high}
            for app_tasks in tasks.values()
            for t in app_tasks
        ],
    )


def workload_stats(requests: Sequence[Request]) -> dict[str, dict[str, float]]:
    """Per application: requests, source documents, input tokens (min/median/max), max_tokens."""
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
                "sources": len({requests[i].source for i in np.flatnonzero(mask)}),
                "input_min": int(t.min()),
                "input_median": float(np.median(t)),
                "input_max": int(t.max()),
                "max_tokens_median": float(np.median(limits[mask])),
                "max_tokens_min": int(limits[mask].min()),
                "max_tokens_max": int(limits[mask].max()),
            }
    return out

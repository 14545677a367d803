"""Real text and code shipped on this machine, read into documents of units (see ``corpus``).

- man pages (``/usr/share/man``, English and Debian's translations), rendered with groff;
- gettext catalogs (``/usr/share/locale/*/LC_MESSAGES/*.mo``): English messages and their
  human translations;
- docstrings of the Python standard library and the license texts in
  ``/usr/share/common-licenses``;
- functions and methods of the standard library's source files.

Every listing is sorted, so the same machine always yields the same documents. Each document
carries the name of its source (see ``corpus``): ``man:<section>/<page>`` (one name for a page
and its translations), ``catalog:<domain>`` (one name for a catalog and its translations),
``license:<file>`` and ``python:<path in the standard library>`` (its functions and docstrings).
"""

from __future__ import annotations

import ast
import gettext
import gzip
import re
import subprocess
import sysconfig
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.workload.corpus import Document, Sourced

MAN_ROOT = Path("/usr/share/man")
LOCALE_ROOT = Path("/usr/share/locale")
LICENSES = Path("/usr/share/common-licenses")
#: Locale directory of each language code used by the workloads.
LOCALE_DIRS = {"fr": "fr", "de": "de", "es": "es", "ru": "ru", "zh": "zh_CN"}
#: Catalogs of names (countries, languages, keyboard layouts) rather than sentences.
NAME_CATALOGS = ("iso_", "xkeyboard-config")
_SKIP_PY_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}

_STOPWORDS = {
    "en": "the and of to is are this that with for be by it not or if when which an as from can will",
    "fr": "le la les des est une un et du pour dans que qui pas sur avec par ce cette sont être ou au aux",
    "de": "der die das und ist nicht ein eine mit für von zu den dem des auf wird werden sie oder wenn sich",
    "es": "el la los las de que y es en un una por con para se no del al lo como su si",
}
_STOPSETS = {lang: set(words.split()) for lang, words in _STOPWORDS.items()}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")
_FORMAT_SPEC = re.compile(r"%[-+ #0-9.*]*[a-zA-Z]|%\(|[\\_&<>=@{}\[\]|/$`]")


def _evenly(items: list, limit: int) -> list:
    """Up to ``limit`` items evenly spaced in order (all for 0)."""
    return items[:: max(1, len(items) // limit)][:limit] if limit else items


def _script_fraction(text: str, lo: str, hi: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(lo <= c <= hi for c in chars) / max(1, len(chars))


def in_language(text: str, lang: str) -> bool:
    """Whether ``text`` is in language ``lang`` (en, fr, de, es by function words; ru, zh by script)."""
    if lang == "ru":
        return _script_fraction(text, "\u0400", "\u04ff") >= 0.5
    if lang == "zh":
        return _script_fraction(text, "\u4e00", "\u9fff") >= 0.3
    if lang == "en" and not text.isascii():
        return False
    words = re.findall(r"\w+", text.lower())
    hits = {code: sum(w in stop for w in words) for code, stop in _STOPSETS.items()}
    return hits[lang] >= 1 and hits[lang] == max(hits.values())


def is_prose(text: str) -> bool:
    """A paragraph of running text: mostly letters, ends like a sentence, no tables or options."""
    chars = [c for c in text if not c.isspace()]
    if not chars or text.startswith(("-", "*", ">>>")) or "    " in text or ">>>" in text:
        return False
    letters = sum(c.isalpha() for c in chars) / len(chars)
    long_enough = len(text.split()) >= 4 or _script_fraction(text, "\u4e00", "\u9fff") >= 0.3
    ends = text.rstrip("\"')»”").endswith((".", "!", "?", "。", "！", "？"))
    return letters >= 0.75 and long_enough and ends


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences; a piece starting in lower case stays with the one before."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(paragraph.strip()):
        if out and piece[:1].islower():
            out[-1] += " " + piece
        elif piece:
            out.append(piece)
    return out


def _wordy(text: str) -> bool:
    chars = [c for c in text if not c.isspace()]
    return len(chars) >= 2 and sum(c.isalpha() for c in chars) >= 0.6 * len(chars)


def paragraphs_to_document(paragraphs: list[str]) -> Document:
    """Sentences of the paragraphs as units: a space between sentences, a blank line between paragraphs.

    Pieces that are not words (markup left over, numbers) are dropped.
    """
    doc: Document = []
    for paragraph in paragraphs:
        for k, sentence in enumerate(s for s in sentences(paragraph) if _wordy(s)):
            doc.append((" " if k else "\n\n", sentence))
    return doc


# --- man pages ---------------------------------------------------------------------------------


def man_pages(lang: str | None) -> list[Path]:
    """Man page sources of one language (None: English), sorted, without links."""
    root = MAN_ROOT / LOCALE_DIRS[lang] if lang else MAN_ROOT
    pages = root.glob("man[1-8]/*.gz")
    # the ~16,000 generated gcloud pages would crowd out every other English page
    return sorted(p for p in pages if p.is_file() and not p.is_symlink() and not p.name.startswith("gcloud"))


def render_man(path: Path) -> list[str]:
    """Prose paragraphs of a man page, each rendered by groff as one line."""
    source = gzip.decompress(path.read_bytes())
    if source.lstrip().startswith(b".so "):
        return []
    rendered = subprocess.run(
        ["groff", "-k", "-man", "-Tutf8", "-rLL=5000n", "-rHY=0", "-P-cbou"],
        input=source,
        capture_output=True,
        timeout=60,
    ).stdout.decode("utf-8", errors="replace")
    lines = rendered.splitlines()[1:-1]  # running header and footer
    return [line.strip() for line in lines if line.startswith("       ") and is_prose(line.strip())]


def man_source(path: Path) -> str:
    """Source name of a man page, the same for every language: ``man:man1/ls.1``."""
    return f"man:{path.parent.name}/{path.name.removesuffix('.gz')}"


def man_documents(lang: str | None, limit: int) -> list[Sourced]:
    """Documents of up to ``limit`` man pages (evenly spaced in sorted order) in one language."""
    chosen = _evenly(man_pages(lang), limit)
    with ThreadPoolExecutor(max_workers=2) as pool:
        rendered = list(pool.map(render_man, chosen))
    code = lang or "en"
    return [
        (man_source(path), paragraphs_to_document([p for p in paras if in_language(p, code)]))
        for path, paras in zip(chosen, rendered, strict=True)
    ]


# --- gettext catalogs --------------------------------------------------------------------------


def _clean_message(text: str) -> str | None:
    text = text.strip()
    if not text or "\n" in text or "  " in text or "\t" in text or _FORMAT_SPEC.search(text):
        return None
    chars = [c for c in text if not c.isspace()]
    return text if sum(c.isalpha() for c in chars) / len(chars) >= 0.8 else None


def catalog_pairs(lang: str, limit: int = 0) -> list[tuple[str, str, str]]:
    """(English message, human translation, catalog domain) of the machine's gettext catalogs for
    ``lang``; a message in several catalogs is taken from the first in sorted order.

    ``limit``: read only that many catalogs, evenly spaced in sorted order (0: all).
    """
    pairs: dict[str, tuple[str, str]] = {}
    catalogs = sorted((LOCALE_ROOT / LOCALE_DIRS[lang] / "LC_MESSAGES").glob("*.mo"))
    for path in _evenly([p for p in catalogs if not p.name.startswith(NAME_CATALOGS)], limit):
        try:
            with path.open("rb") as fh:
                catalog = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        for msgid, msgstr in catalog.items():
            if not isinstance(msgid, str):  # plural forms are keyed (msgid, n)
                continue
            # a message with a context is keyed "context\x04message"
            en, tr = _clean_message(msgid.rpartition("\x04")[2]), _clean_message(msgstr)
            if not (en and tr and en != tr and len(en.split()) >= 2 and in_language(en, "en")):
                continue
            # short Latin-script messages have too few function words to test; scripts are checked
            if lang not in ("ru", "zh") or in_language(tr, lang):
                pairs.setdefault(en, (tr, path.stem))
    return [(en, tr, domain) for en, (tr, domain) in sorted(pairs.items())]


# --- Python standard library -------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_source(path: Path) -> str:
    """Source name of a Python file: ``python:json/decoder.py`` (the path within the standard library)."""
    root = _stdlib_root()
    return f"python:{path.relative_to(root) if path.is_relative_to(root) else path}"


def stdlib_files(limit: int = 0) -> list[Path]:
    """Python source files of the standard library, without its tests (evenly spaced if limited)."""
    root = _stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py") if not _SKIP_PY_DIRS & set(p.relative_to(root).parts[:-1])
    )
    return _evenly(files, limit)


def _parse(path: Path) -> tuple[ast.Module, list[str]] | None:
    try:
        source = path.read_text(encoding="utf-8")
        return ast.parse(source), source.splitlines()
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def python_documents(files: list[Path]) -> tuple[list[Sourced], list[Sourced]]:
    """Functions and docstrings of the files, both named by their file.

    Functions: per file, the dedented source of its functions and methods in order (decorators
    included). Docstrings: prose paragraphs of each module, class and function docstring.
    """
    functions: list[Sourced] = []
    docstrings: list[Sourced] = []
    for path in files:
        parsed = _parse(path)
        if parsed is None:
            continue
        tree, lines = parsed
        source = python_source(path)
        doc: Document = []
        for node in _functions(tree):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            code = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
            if "\t" not in code and code.count("\n") >= 1:
                doc.append(("\n\n\n", code))
        functions.append((source, doc))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text:
                    docstrings.append((source, paragraphs_to_document(_text_paragraphs(text))))
    return functions, docstrings


def _text_paragraphs(text: str) -> list[str]:
    """Paragraphs of plain text (blank-line separated, lines joined) that read as English prose."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        if any(line[:1] in "-*+|:" or re.match(r"\d+[.)]\s", line) for line in lines):
            continue
        paragraph = " ".join(lines)
        if is_prose(paragraph) and in_language(paragraph, "en"):
            out.append(paragraph)
    return out


def license_documents() -> list[Sourced]:
    """Prose paragraphs of the license texts in /usr/share/common-licenses, one document per file."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return [(f"license:{p.name}", paragraphs_to_document(_text_paragraphs(p.read_text(errors="replace"))))
            for p in files]

"""Turn real text and code into application inputs: grammar errors, rude phrasing, bugs, no comments.

Every function takes a ``numpy`` generator, so a workload is reproducible from its seed. An edit
is ``(start, end, replacement)`` on the original string; edits never overlap.
"""

from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize

import numpy as np

Edit = tuple[int, int, str]


def apply_edits(text: str, edits: list[Edit]) -> str:
    """Apply non-overlapping edits (offsets into ``text``)."""
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


# --- grammar errors ----------------------------------------------------------------------------

_ARTICLES = {"a": ["the", "an", ""], "an": ["a", "the", ""], "the": ["a", ""]}
_AGREEMENT = {
    "is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has",
    "does": "do", "do": "does", "doesn't": "don't", "don't": "doesn't", "isn't": "aren't",
    "aren't": "isn't", "this": "these", "these": "this", "much": "many", "many": "much",
}
_PREPOSITIONS = ["in", "on", "at", "of", "for", "to", "from", "with", "by", "into", "about"]
_CONFUSABLES = {
    "its": "it's", "it's": "its", "their": "there", "there": "their", "then": "than", "than": "then",
    "your": "you're", "affect": "effect", "effect": "affect", "lose": "loose", "whose": "who's",
    "fewer": "less", "whether": "weather", "who": "which", "which": "what",
}
_MISSPELLINGS = {
    "receive": "recieve", "separate": "seperate", "occurred": "occured", "necessary": "neccessary",
    "definitely": "definately", "environment": "enviroment", "argument": "arguement",
    "until": "untill", "beginning": "begining", "successful": "succesful", "address": "adress",
    "different": "diffrent", "length": "lenght", "because": "becuase", "believe": "beleive",
    "existing": "exisiting", "available": "availible", "independent": "independant",
    "occurrence": "occurence", "whether": "wether", "recommend": "reccomend", "maintenance": "maintainance",
    "necessarily": "neccessarily", "immediately": "immediatly", "separately": "seperately",
    "referred": "refered", "committed": "commited", "privilege": "priviledge", "truly": "truely",
}
_SUBJECTS = {"it", "this", "that", "which", "he", "she", "one", "who"}
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
GRAMMAR_ERRORS = (
    "article", "agreement", "preposition", "confusable", "spelling", "verb_form", "word_order",
    "duplicate", "punctuation",
)


def _match_case(original: str, replacement: str) -> str:
    return replacement[:1].upper() + replacement[1:] if original[:1].isupper() else replacement


def _grammar_candidates(text: str, kind: str) -> list[Edit]:
    words = list(_WORD.finditer(text))
    out: list[Edit] = []
    for k, m in enumerate(words):
        w, lw, (s, e) = m.group(), m.group().lower(), m.span()
        if kind == "article" and lw in _ARTICLES:
            out += [(s, e + 1, "") if not r else (s, e, _match_case(w, r)) for r in _ARTICLES[lw]]
        elif kind == "agreement" and lw in _AGREEMENT:
            out.append((s, e, _match_case(w, _AGREEMENT[lw])))
        elif kind == "preposition" and lw in _PREPOSITIONS:
            out += [(s, e, _match_case(w, p)) for p in _PREPOSITIONS if p != lw]
        elif kind == "confusable" and lw in _CONFUSABLES:
            out.append((s, e, _match_case(w, _CONFUSABLES[lw])))
        elif kind == "spelling" and len(w) >= 6 and w.isalpha():
            inner = int(len(w) // 2)  # a letter transposition, or a known misspelling
            typo = _MISSPELLINGS.get(lw) or w[: inner - 1] + w[inner] + w[inner - 1] + w[inner + 1 :]
            if typo.lower() != lw:
                out.append((s, e, _match_case(w, typo)))
        elif kind == "verb_form" and k and words[k - 1].group().lower() in _SUBJECTS:
            if lw.endswith("s") and not lw.endswith(("ss", "us", "is")) and len(lw) > 3:
                out.append((s, e, w[:-1]))
        elif kind == "word_order" and k + 1 < len(words) and w.islower() and words[k + 1].group().islower():
            nxt = words[k + 1]
            if text[e : nxt.start()] == " " and lw != nxt.group():
                out.append((s, nxt.end(), f"{nxt.group()} {w}"))
        elif kind == "duplicate" and len(w) <= 4 and w.islower():
            out.append((s, e, f"{w} {w}"))
    if kind == "punctuation":
        out += [(m.start(), m.end(), "") for m in re.finditer(r",(?= )", text)]
        out += [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"(?<=\. )[A-Z](?=[a-z])", text)]
    return out


def inject_grammar_errors(text: str, rng: np.random.Generator, per_words: int = 12) -> tuple[str, int]:
    """Text with about one error per ``per_words`` words (at least one); returns it and the count."""
    wanted = max(1, round(len(_WORD.findall(text)) / per_words))
    candidates = {kind: _grammar_candidates(text, kind) for kind in GRAMMAR_ERRORS}
    kinds = [kind for kind in GRAMMAR_ERRORS if candidates[kind]]
    edits: list[Edit] = []
    for _ in range(8 * wanted if kinds else 0):
        if len(edits) == wanted:
            break
        pool = candidates[str(_pick(rng, kinds))]
        start, end, repl = pool[int(rng.integers(len(pool)))]
        if all(end <= s or start >= e for s, e, _ in edits):
            edits.append((start, end, repl))
    return apply_edits(text, edits), len(edits)


# --- rude phrasing -----------------------------------------------------------------------------

_OPENERS = [
    "Listen, you idiot: ", "Are you completely clueless? ", "For crying out loud, ",
    "God, you are dense. ", "Wake up, moron. ", "Read this, dumbass: ", "Pay attention, you lazy slob. ",
    "How many times do I have to say it, genius? ", "Ugh, you absolute clown. ",
    "Seriously, are you stupid? ",
]
_CLOSERS = [
    " Even a child could get that.", " Is that too hard for your tiny brain?", " Stop wasting my damn time.",
    " What the hell is wrong with you?", " Get it through your thick skull.", " What a pathetic question.",
    " Don't be such a useless idiot about it.", " Learn to read, for God's sake.",
    " Figure it out yourself next time, loser.", " Honestly, who let you near a computer?",
]
_INTERJECTIONS = [" Obviously, you moron.", " Duh.", " Are you even listening, idiot?", " Unbelievable.",
                  " Pathetic.", " Use your damn head."]
_INTENSIFIERS = ["damn", "stupid", "freaking", "goddamn", "crappy", "bloody", "idiotic", "lousy", "useless"]
_DETERMINERS = {"the", "your", "these", "those", "its", "their"}


def make_rude(text: str, rng: np.random.Generator, per_words: int = 25) -> str:
    """A rude version of a polite text: insults around it, profane intensifiers, jibes between sentences."""
    words = list(_WORD.finditer(text))
    slots = [
        words[k + 1].start()
        for k in range(len(words) - 1)
        if words[k].group().lower() in _DETERMINERS and words[k + 1].group().islower()
    ]
    n = min(len(slots), max(1, len(words) // per_words))
    chosen = rng.choice(slots, n, replace=False) if slots else []
    edits: list[Edit] = [(int(p), int(p), f"{_pick(rng, _INTENSIFIERS)} ") for p in chosen]
    for m in re.finditer(r"(?<=[.!?]) (?=[A-Z])", text):
        if rng.random() < 0.2:
            edits.append((m.start(), m.start(), str(_pick(rng, _INTERJECTIONS))))
    rude = apply_edits(text, edits)
    closer = rng.random() < 0.7
    if rng.random() < 0.7 or not closer:
        opener = str(_pick(rng, _OPENERS))
        if opener.endswith((", ", ": ")) and rude[1:2].islower():
            rude = rude[:1].lower() + rude[1:]
        rude = opener + rude
    if closer:
        rude += str(_pick(rng, _CLOSERS))
    return rude


# --- bugs --------------------------------------------------------------------------------------

_COMPARE_SWAP = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "=="}
_ARITH_SWAP = {"+": "-", "-": "+", "+=": "-=", "-=": "+=", "*": "/", "//": "/"}
BUG_KINDS = ("comparison", "arithmetic", "boolean", "off_by_one", "swapped_args")
_DIGITS = set("0123456789")
_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class _Source:
    """Character offsets of tokens and AST nodes of one piece of Python source."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.lines = code.splitlines(keepends=True)
        self.starts = np.concatenate(([0], np.cumsum([len(line) for line in self.lines]))).tolist()
        self.tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
        self.tree = ast.parse(code)

    def offset(self, row: int, col: int, utf8: bool = False) -> int:
        line = self.lines[row - 1] if row <= len(self.lines) else ""
        if utf8:  # ast columns count UTF-8 bytes
            col = len(line.encode()[:col].decode(errors="ignore"))
        return self.starts[row - 1] + col

    def span(self, node: ast.expr) -> tuple[int, int]:
        return (
            self.offset(node.lineno, node.col_offset, utf8=True),
            self.offset(node.end_lineno or node.lineno, node.end_col_offset or 0, utf8=True),
        )

    def token_span(self, tok: tokenize.TokenInfo) -> tuple[int, int]:
        return self.offset(*tok.start), self.offset(*tok.end)


def _bug_candidates(src: _Source, kind: str) -> list[list[Edit]]:
    out: list[list[Edit]] = []
    toks = [t for t in src.tokens if t.type not in (tokenize.NL, tokenize.COMMENT)]
    for k, tok in enumerate(toks):
        prev = toks[k - 1] if k else None
        binary = prev is not None and (
            prev.type == tokenize.NUMBER
            or prev.string in ")]}"
            or (prev.type == tokenize.NAME and not keyword.iskeyword(prev.string))
        )
        s, e = src.token_span(tok)
        if kind == "comparison" and tok.string in _COMPARE_SWAP:
            out.append([(s, e, _COMPARE_SWAP[tok.string])])
        elif kind == "arithmetic" and tok.string in _ARITH_SWAP and binary:
            out.append([(s, e, _ARITH_SWAP[tok.string])])
        elif kind == "boolean" and tok.type == tokenize.NAME and tok.string in ("and", "or"):
            out.append([(s, e, "or" if tok.string == "and" else "and")])
        elif kind == "boolean" and tok.string == "not" and k + 1 < len(toks) and toks[k + 1].string != "in":
            if prev is None or prev.string != "is":
                out.append([(s, src.token_span(toks[k + 1])[0], "")])
        elif kind == "off_by_one" and tok.type == tokenize.NUMBER and tok.string in _DIGITS:
            n = int(tok.string)
            out += [[(s, e, str(m))] for m in (n - 1, n + 1) if m >= 0]
    for node in ast.walk(src.tree):
        if not isinstance(node, ast.Call):
            continue
        if kind == "off_by_one" and isinstance(node.func, ast.Name) and node.args:
            if node.func.id == "len":
                out.append([(src.span(node)[1], src.span(node)[1], " - 1")])
            elif node.func.id == "range" and len(node.args) <= 2:
                end = src.span(node.args[-1])[1]
                out.append([(end, end, " + 1")])
        elif kind == "swapped_args" and len(node.args) >= 2:
            a, b = node.args[:2]
            if not isinstance(a, ast.Starred) and not isinstance(b, ast.Starred):
                (sa, ea), (sb, eb) = src.span(a), src.span(b)
                if src.code[sa:ea] != src.code[sb:eb]:
                    out.append([(sa, ea, src.code[sb:eb]), (sb, eb, src.code[sa:ea])])
    return out


def inject_bug(code: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """The code with one bug of a random kind (see ``BUG_KINDS``) and the kind, or None if none fits."""
    try:
        src = _Source(code)
    except (SyntaxError, tokenize.TokenError):
        return None
    candidates = {kind: _bug_candidates(src, kind) for kind in BUG_KINDS}
    kinds = [kind for kind in BUG_KINDS if candidates[kind]]
    for _ in range(10):
        if not kinds:
            return None
        kind = str(_pick(rng, kinds))
        edits = candidates[kind][int(rng.integers(len(candidates[kind])))]
        buggy = apply_edits(code, edits)
        try:
            ast.parse(buggy)
        except SyntaxError:
            continue
        if buggy != code:
            return buggy, kind
    return None


# --- comments ----------------------------------------------------------------------------------


def _is_docstring(stmt: ast.stmt) -> bool:
    value = stmt.value if isinstance(stmt, ast.Expr) else None
    return isinstance(value, ast.Constant) and isinstance(value.value, str)


def strip_comments(code: str) -> str | None:
    """The code without ``#`` comments and docstrings (a docstring-only body becomes ``pass``)."""
    try:
        src = _Source(code)
    except (SyntaxError, tokenize.TokenError):
        return None
    lines: dict[int, str | None] = {}  # 1-based line -> replacement (None: drop)
    for node in ast.walk(src.tree):
        body = getattr(node, "body", None)
        if not isinstance(node, _SCOPES) or not body:
            continue
        first = body[0]
        if _is_docstring(first):
            for row in range(first.lineno, (first.end_lineno or first.lineno) + 1):
                lines[row] = None
            if len(body) == 1:
                lines[first.lineno] = " " * first.col_offset + "pass\n"
    for tok in src.tokens:
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            before = src.lines[row - 1][:col]
            lines[row] = None if not before.strip() else before.rstrip() + "\n"
    kept = [lines.get(row, line) for row, line in enumerate(src.lines, start=1)]
    stripped = re.sub(r"\n{4,}", "\n\n\n", "".join(line for line in kept if line is not None)).strip("\n")
    try:
        ast.parse(stripped)
    except SyntaxError:
        return None
    return stripped

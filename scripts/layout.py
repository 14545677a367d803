"""Lines of Python per top-level package and the import arrows between them (imports by name and
``importlib.import_module("...")`` strings). Usage: ``python scripts/layout.py [ROOT]``."""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path


def packages(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists() or p.name == "tests")


def imported(tree: ast.AST) -> list[str]:
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            out.append(n.module)
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) == "import_module":
            out += [a.value for a in n.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif isinstance(n, ast.Tuple) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in n.elts):
            # ("module.path", "function") pairs handed to importlib in a loop
            out += [e.value for e in n.elts[:1] if "." in e.value and " " not in e.value and "/" not in e.value]
    return out


def main(root: Path) -> None:
    pkgs = packages(root)
    lines: Counter[str] = Counter()
    arrows: Counter[tuple[str, str]] = Counter()
    for pkg in pkgs:
        for f in (root / pkg).rglob("*.py"):
            text = f.read_text()
            lines[pkg] += text.count("\n")
            for mod in imported(ast.parse(text)):
                top = mod.split(".")[0]
                if top in pkgs and top != pkg:
                    arrows[(pkg, top)] += 1
    print("| package | lines |\n| --- | ---: |")
    for pkg in pkgs:
        print(f"| {pkg} | {lines[pkg]} |")
    print("\n| from | to | imports |\n| --- | --- | ---: |")
    for (a, b), n in sorted(arrows.items()):
        print(f"| {a} | {b} | {n} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))

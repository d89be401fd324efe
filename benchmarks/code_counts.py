"""Counts of how often the code says a thing, for the "say each thing once" figures.

    python benchmarks/code_counts.py [ROOT]        # ROOT: a checkout's vit_jax/ (default: ours)

Prints the functions over 60 lines, the `# fmt: skip` markers, and per weights format the rows of
its key / capability tables and its hand-written lines: code lines (not blank, not comments, not
docstrings, not imports) outside module-level assignments that build a table (`Table`, `Row`,
`pair`, `Capabilities`, `Can`). Run it on an older checkout (`git archive REV vit_jax | tar -x -C
DIR`) to compare. Standard library only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LONG = 60
FORMATS = ("timm", "hf", "hf_dinov2", "hf_dinov3", "hf_siglip", "hf_siglip_text")
TABLE_CALLS = {"Table", "Capabilities", "Row", "Can", "pair"}


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        if isinstance(node, kinds) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def _table_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            calls = {
                getattr(c.func, "id", None) for c in ast.walk(node.value) if isinstance(c, ast.Call)
            }
            if calls & TABLE_CALLS:
                lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def format_counts(path: Path) -> tuple[int, int]:
    """(table rows, hand-written lines) of one format module."""
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    skip = _docstring_lines(tree)
    tables = _table_lines(tree)
    code = [
        i
        for i, line in enumerate(lines, 1)
        if line.strip() and not line.strip().startswith("#") and i not in skip
    ]
    rows = sum(
        1
        for i in code
        if i in tables and any(f"{c}(" in lines[i - 1] for c in ("Row", "pair", "Can"))
    )
    hand = [
        i
        for i in code
        if i not in tables and not lines[i - 1].lstrip().startswith(("import ", "from "))
    ]
    return rows, len(hand)


def main(root: Path) -> None:
    long_functions = []
    markers = 0
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        markers += text.count("# fmt: skip")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONG:
                    long_functions.append((length, f"{path.relative_to(root)}:{node.lineno}"))
    print(f"functions over {LONG} lines: {len(long_functions)}")
    for length, where in sorted(long_functions, reverse=True):
        print(f"  {length:4d}  {where}")
    print(f"# fmt: skip markers: {markers}")
    print("weights format: table rows, hand-written lines")
    for name in FORMATS:
        path = root / "weights" / f"{name}.py"
        if path.exists():
            rows, hand = format_counts(path)
            print(f"  {name:16s} {rows:4d} {hand:5d}")


if __name__ == "__main__":
    main(
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "vit_jax"
    )

"""The API reference is made of the docstrings: each example in them must be code that
parses (a "\n" in a docstring that is not raw becomes a line break, which split an
example's string in two and left the whole docstring unrendered)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "threadbridge"


def _examples() -> list[tuple[str, str]]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            lines = inspect.cleandoc(doc).splitlines()
            for start, line in enumerate(lines):
                if line.strip() not in ("Example:", "Examples:"):
                    continue
                block = []
                for text in lines[start + 1 :]:
                    if text and not text.startswith(" "):
                        break  # the next section
                    block.append(text)
                name = f"{path.relative_to(SOURCE)}:{node.name}"
                found.append((name, textwrap.dedent("\n".join(block))))
    return found


EXAMPLES = _examples()


def test_there_are_examples_to_check() -> None:
    assert len(EXAMPLES) > 20


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_every_docstring_example_parses(where: str, code: str) -> None:
    ast.parse(code, where)  # parses: a fragment may `return` or `await` at its top

"""Every public function and method of tasks/core has type hints on all its arguments and
its return (issue 12): mypy then checks each caller against them.

mypy has no switch for "public functions only" (``disallow_untyped_defs`` takes every
private helper and closure too), so this reads the source: a function is public when
neither it nor its class starts with ``_``; dunders count (``__init__`` included), and
``self``/``cls`` need no hint. Run by ``make lint`` as a script, and by pytest.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "tasks" / "core"


def missing_hints(folder: Path = CORE) -> list[str]:
    """``file:line name: what is missing`` for each public function short of hints."""
    found: list[str] = []

    def visit(node: ast.AST, prefix: str, public: bool, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", public and not child.name.startswith("_"), path)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = child.name
                dunder = name.startswith("__") and name.endswith("__")
                if not public or (name.startswith("_") and not dunder):
                    continue
                a = child.args
                args = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
                if prefix and args and args[0].arg in ("self", "cls"):
                    args = args[1:]
                what = [f"argument {x.arg}" for x in args if x.annotation is None]
                if child.returns is None:
                    what.append("return")
                if what:
                    found.append(f"{path.name}:{child.lineno} {prefix}{name}: no hint on {', '.join(what)}")

    for path in sorted(folder.glob("*.py")):
        visit(ast.parse(path.read_text()), "", True, path)
    return found


def test_public_functions_of_the_core_have_hints() -> None:
    assert missing_hints() == []


if __name__ == "__main__":
    problems = missing_hints()
    for line in problems:
        print(f"tasks/core/{line}")
    if problems:
        print(f"{len(problems)} public functions of tasks/core without full type hints", file=sys.stderr)
    sys.exit(1 if problems else 0)

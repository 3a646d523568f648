"""``keepflow.tasks.core`` is the Prefect-free library: importing it must never import prefect.

The read-only CLI commands and anyone embedding the library rely on this (no
second-long Prefect start-up, no Prefect settings side effects). Checked two
ways: dynamically, by importing every module in a fresh interpreter, and
statically, by looking for import lines in the sources.
"""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import keepflow.tasks.core

ROOT = Path(__file__).resolve().parent.parent
CORE_DIR = Path(keepflow.tasks.core.__file__).resolve().parent

_CHILD = r"""
import importlib, json, pkgutil, sys
import keepflow.tasks.core
names = sorted(m.name for m in pkgutil.walk_packages(keepflow.tasks.core.__path__, "keepflow.tasks.core."))
for name in names:
    importlib.import_module(name)
print(json.dumps({
    "modules": names,
    "prefect": sorted(m for m in sys.modules if m == "prefect" or m.startswith("prefect.")),
}))
"""


def _core_module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(CORE_DIR)], "keepflow.tasks.core."))


def test_importing_every_core_module_does_not_import_prefect():
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The child really imported the whole package, not an empty list.
    assert report["modules"] == _core_module_names()
    for expected in ("keepflow.tasks.core.backup", "keepflow.tasks.core.restore", "keepflow.tasks.core.scan",
                     "keepflow.tasks.core.repository"):
        assert expected in report["modules"]
    assert report["prefect"] == [], f"keepflow.tasks.core pulled in Prefect: {report['prefect'][:10]}"


_IMPORT_LINE = re.compile(r"^\s*(?:import\s+prefect\b|from\s+prefect\b)", re.MULTILINE)


def test_no_core_source_file_has_a_prefect_import_line():
    sources = sorted(CORE_DIR.rglob("*.py"))
    assert len(sources) >= 10  # the package is where we think it is
    offenders = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for match in _IMPORT_LINE.finditer(text):
            line_no = text.count("\n", 0, match.start()) + 1
            offenders.append(f"{path.relative_to(ROOT)}:{line_no}: {match.group(0).strip()}")
    assert offenders == []


def test_the_static_check_would_catch_an_import():
    # Guard against a regex that matches nothing.
    assert _IMPORT_LINE.search("x = 1\nfrom prefect import flow\n")
    assert _IMPORT_LINE.search("def f():\n    import prefect.client\n")
    assert not _IMPORT_LINE.search("import prefectish\n# talk about prefect\n")

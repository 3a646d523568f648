"""What a flow command's start-up keeps out of the process, checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from keepflow.flows.cli.startup import skip_httpx_cli
skip_httpx_cli()
import httpx, prefect.main, prefect.flow_engine
assert "click" not in sys.modules and "rich.syntax" not in sys.modules, "httpx's CLI was imported"
try:
    httpx.main(["--help"])          # the stand-in loads and runs the real tool
except SystemExit as exc:
    assert exc.code == 0, exc.code
assert "click" in sys.modules
print("ok")
"""


def test_httpx_cli_is_loaded_only_when_used():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip().endswith("ok")

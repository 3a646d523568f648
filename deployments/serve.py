"""Serve keepflow's scheduled jobs from one process: ``python deployments/serve.py CONFIG``.

The same as ``keepflow serve CONFIG`` (flows/serve.py does the work): reads the
TOML configuration (format in README.md, "Scheduling"; example in
deployments/keepflow.example.toml), builds one deployment per job with
``flow.to_deployment(...)`` -- incremental and full backups per source,
replicate (also triggered by each ``keepflow.backup.completed`` event), prune
and verify per repository, each with ``concurrency_limit=1`` -- and runs them
all with ``prefect.serve(...)``. No work pool or worker is needed; a Prefect
server is (``PREFECT_API_URL``), because its scheduler creates the runs.

Options: ``--check`` (validate and list the jobs), ``--limit N`` (at most N
runs at once). For Prefect's log lines use ``keepflow -v serve CONFIG``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script from a checkout: make flows/ and tasks/ importable even
    # when keepflow is not installed into the environment.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from keepflow.flows.cli import main

    raise SystemExit(main(["serve", *sys.argv[1:]]))

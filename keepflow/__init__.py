"""keepflow: backup and restore as Prefect flows.

The installed package holds the code as ``keepflow.tasks`` (the Prefect-free
library, ``keepflow.tasks.core``, and the Prefect tasks) and ``keepflow.flows``
(flows and the command line); in a source checkout they are the folders
``tasks/`` and ``flows/``, mapped here by pyproject.toml's ``package-dir``.
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Read on first use: importlib.metadata costs ~50 ms at import, which every
    # command (read-only ones take ~0.3 s in all) would otherwise pay.
    if name == "__version__":
        from importlib import metadata

        try:
            version = metadata.version("keepflow")
        except metadata.PackageNotFoundError:     # a source tree that was never installed
            version = "0+unknown"
        globals()["__version__"] = version
        return version
    raise AttributeError(f"module 'keepflow' has no attribute {name!r}")

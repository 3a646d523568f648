"""keepflow: backup and restore as Prefect flows.

The installed package holds the code as ``keepflow.tasks`` (the Prefect-free
library, ``keepflow.tasks.core``, and the Prefect tasks) and ``keepflow.flows``
(flows and the command line); in a source checkout they are the folders
``tasks/`` and ``flows/``, mapped here by pyproject.toml's ``package-dir``.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__: str = _metadata.version("keepflow")
except _metadata.PackageNotFoundError:     # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]

"""Prefect tasks of keepflow; the Prefect-free library is ``keepflow.tasks.core``."""

# Installed as ``keepflow.tasks`` (pyproject.toml's package-dir). Imported as plain
# ``tasks`` (a source checkout's folder on sys.path) it would be a second copy of
# every module, with its own caches and exception classes: refuse that loudly.
if __name__ != "keepflow.tasks":
    raise ImportError(f"import keepflow.tasks, not {__name__}: the code is installed as the keepflow package")

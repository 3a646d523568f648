"""keepflow's Prefect flows and its command line (``keepflow.flows.cli``)."""

# Installed as ``keepflow.flows`` (pyproject.toml's package-dir). Imported as plain
# ``flows`` (a source checkout's folder on sys.path) it would be a second copy of
# every module, with its own caches and exception classes: refuse that loudly.
if __name__ != "keepflow.flows":
    raise ImportError(f"import keepflow.flows, not {__name__}: the code is installed as the keepflow package")

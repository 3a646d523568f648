"""``python -m keepflow.flows.cli COMMAND ...``: the same as the ``keepflow`` command."""

from keepflow.flows.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

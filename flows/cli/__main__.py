"""``python -m keepflow.flows.cli COMMAND ...``: the same as the ``keepflow`` command."""

from keepflow.flows.cli import console

if __name__ == "__main__":
    console()

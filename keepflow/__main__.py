"""``python -m keepflow COMMAND ...``: the same as the ``keepflow`` command."""

from keepflow.flows.cli import console

if __name__ == "__main__":
    console()

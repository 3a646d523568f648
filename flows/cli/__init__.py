"""The ``keepflow`` command.

Read-only commands (``snapshots``, ``ls``, ``diff``, ``replicas``, ``stats``,
``key``) call ``keepflow.tasks.core`` directly: no flow run, no Prefect import,
an answer in well under a second. Commands that change data (``backup``,
``restore``, ...) run a Prefect flow, so every such run is in Prefect's
history.

Output: human-readable text on stdout, progress bars on stderr when it is a
terminal, ``--json`` for one JSON object on stdout and nothing else. Errors a
user can cause print one line (``keepflow: error: ...``) and exit non-zero:
0 ok, 1 failed / no snapshot written, 2 usage, 3 snapshot written with
skipped files, 10 no usable repository.

The package, one job per module: ``parser`` (the argparse tree and its
shared options), ``errors`` (exception -> one line and exit code),
``startup`` (before a command: pyarrow's pandas probe, Prefect's environment,
running a flow), ``output`` (the one JSON writer, tables, the read-only
commands' text), ``reports`` (the text of flow summaries), ``readonly`` and
``commands`` (the commands), ``server`` (``keepflow server``).
"""

from __future__ import annotations

import sys

from keepflow.flows.cli import commands, readonly, server
from keepflow.flows.cli.errors import run
from keepflow.flows.cli.parser import build_parser
from keepflow.flows.cli.startup import skip_pyarrow_pandas_probe
from keepflow.tasks.core.errors import EXIT_USAGE

__all__ = ["main", "build_parser"]

COMMANDS = {
    "init": commands.cmd_init, "backup": commands.cmd_backup, "restore": commands.cmd_restore,
    "snapshots": readonly.cmd_snapshots, "ls": readonly.cmd_ls, "diff": readonly.cmd_diff,
    "key": readonly.cmd_key, "server": server.cmd_server,
    "replicate": commands.cmd_replicate, "replicas": readonly.cmd_replicas, "verify": commands.cmd_verify,
    "prune": commands.cmd_prune, "unlock": commands.cmd_unlock, "repair": commands.cmd_repair,
    "stats": readonly.cmd_stats, "serve": commands.cmd_serve,
}


def main(argv=None) -> int:
    skip_pyarrow_pandas_probe()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run(_dispatch, args)


def _dispatch(args) -> int:
    if getattr(args, "password_file", None):
        from keepflow.tasks.core import passwords

        passwords.use_password_file(args.password_file)
    return COMMANDS[args.command](args)

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

from keepflow.flows.cli import commands, readonly, server, warm
from keepflow.flows.cli.errors import run
from keepflow.flows.cli.parser import build_parser
from keepflow.tasks.core.errors import EXIT_USAGE
from keepflow.tasks.core.pandas_probe import skip_pyarrow_pandas_probe

__all__ = ["main", "console", "shut_down", "build_parser"]

COMMANDS = {
    "init": commands.cmd_init, "backup": commands.cmd_backup, "restore": commands.cmd_restore,
    "snapshots": readonly.cmd_snapshots, "ls": readonly.cmd_ls, "diff": readonly.cmd_diff,
    "key": readonly.cmd_key, "server": server.cmd_server,
    "replicate": commands.cmd_replicate, "replicas": readonly.cmd_replicas, "verify": commands.cmd_verify,
    "prune": commands.cmd_prune, "unlock": commands.cmd_unlock, "repair": commands.cmd_repair,
    "stats": readonly.cmd_stats, "serve": commands.cmd_serve,
}


def main(argv=None, warm_process: bool = False) -> int:
    """Run one command; ``warm_process``: in the warm process if one serves it (flows/cli/warm.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if warm_process and warm.may_take(args):
        code = warm.delegate(argv, args.command)
        if code is not None:
            return code
    skip_pyarrow_pandas_probe()
    return run(_dispatch, args)


def console() -> None:
    """The ``keepflow`` console script: ``main()``, then an exit without interpreter teardown.

    Why: once the command's work is done and its output written, tearing down
    a process that imported Prefect (thousands of modules and objects,
    Arrow's thread pools) took another 0.3-0.9 s here, on every command. The
    shutdown steps that matter still run, in the interpreter's own order:
    ``threading._shutdown`` (joins non-daemon threads and runs the
    ``threading._register_atexit`` hooks with which Prefect drains its log and
    event workers), then the ``atexit`` handlers (Prefect stops its temporary
    server there; logging is flushed), then stdout and stderr are flushed and
    ``os._exit`` ends the process. ``main()`` stays a plain function for
    callers in the same process. A flow command may run in the warm process
    of ``keepflow server start`` (flows/cli/warm.py), which prints its output
    on this process's own streams.
    """
    try:
        code = main(warm_process=True)
    except SystemExit as exc:                 # argparse: --help, usage errors
        code = exc.code
    shut_down(code)


def shut_down(code, exit_process: bool = True) -> int:
    """The end of ``console``: Prefect's shutdown hooks, atexit, flushed streams, then ``os._exit(code)``.

    ``exit_process=False`` (a command in the warm process): everything but the
    exit, and the exit code returned.
    """
    import atexit
    import os
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):         # a closed pipe (`keepflow ls | head`): nothing more to say
            pass
    if exit_process:
        os._exit(code)
    return code


def _dispatch(args) -> int:
    if getattr(args, "password_file", None):
        from keepflow.tasks.core import passwords

        passwords.use_password_file(args.password_file)
    return COMMANDS[args.command](args)

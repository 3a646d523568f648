"""What a command raises, as one line on stderr and an exit code.

Errors a user can cause print one line (``keepflow: error: ...``) and exit
non-zero: 0 ok, 1 failed / no snapshot written, 2 usage, 3 snapshot written
with skipped files, 10 no usable repository, 11 a conflicting lease, 12 no
space left (each ``KeepflowError`` carries its own code,
``tasks/core/errors.py``), 130 interrupted. Anything else is a bug: still
one line, the traceback only with ``--debug``.
"""

from __future__ import annotations

import sys

from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_NO_SPACE, KeepflowError


def fail(message: str) -> None:
    print(f"keepflow: error: {message}", file=sys.stderr)


def run(command, args) -> int:
    """``command(args)``'s exit code, or the one for what it raised (after printing the error line)."""
    try:
        return command(args)
    except KeepflowError as exc:
        fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        fail("interrupted; the repository is consistent, run the command again to finish")
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        fail(f"{exc.strerror or exc}{where}")
        from keepflow.tasks.core.storage import is_no_space

        return EXIT_NO_SPACE if is_no_space(exc) else EXIT_FAILED
    except Exception as exc:  # a bug: still one line, traceback only on request
        if args.debug:
            raise
        fail(f"unexpected {type(exc).__name__}: {exc}; rerun with --debug for details")
        return EXIT_FAILED

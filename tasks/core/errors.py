"""keepflow's own errors: one small tree, each a message a user can act on.

Following borg's habit, every class carries the exit code the CLI maps it to
and a message template in ``template``; the CLI prints ``str(error)`` on one
line and exits with ``error.exit_code``. Errors the user cannot act on (bugs)
are ordinary Python exceptions and are not caught here.

Exit codes (restic-like): 0 clean, 1 no snapshot written / operation failed,
2 usage error, 3 snapshot written but some files were skipped,
10 repository missing or unusable, 11 leased by a conflicting run,
12 the repository's storage is full.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NO_REPO = 10
EXIT_LEASED = 11
EXIT_NO_SPACE = 12


class KeepflowError(Exception):
    """Base class; ``template`` is formatted with the keyword arguments."""

    template = "keepflow failed"
    exit_code = EXIT_FAILED

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.fields = fields
        super().__init__(message if message is not None else self.template.format(**fields))


class UsageError(KeepflowError):
    template = "{what}"
    exit_code = EXIT_USAGE


class BadPatternError(UsageError):
    template = "bad pattern {pattern!r}: {reason}; use gitignore syntax, e.g. '*.tmp' or 'build/'"


class SourceNotFoundError(UsageError):
    template = "source {source} does not exist or is not a directory; check the path"


class RepositoryError(KeepflowError):
    exit_code = EXIT_NO_REPO


class RepositoryNotFoundError(RepositoryError):
    template = "no keepflow repository at {url}; create one with `keepflow init {url}` or run a backup into it"


class NotARepositoryError(RepositoryError):
    template = (
        "{url} already holds something that is not a keepflow repository; "
        "choose an empty or new location"
    )


class RepositoryVersionError(RepositoryError):
    template = (
        "repository {url} has format version {found}, newer than this keepflow understands ({supported}); "
        "upgrade keepflow"
    )


class RepositoryExistsError(RepositoryError):
    template = "a keepflow repository already exists at {url}; nothing to do"


class StorageError(KeepflowError):
    template = "cannot access {url}: {reason}"
    kind: str | None = None      # storage.classify's kind ("unreachable", "not-found"...), for the retry policy


class SnapshotNotFoundError(UsageError):
    template = "no snapshot matches {ref!r} in {url}; list them with `keepflow snapshots {url}`"


class AmbiguousSnapshotError(UsageError):
    template = "snapshot id {ref!r} is ambiguous ({count} match); give more characters of the id"


class NoSnapshotsError(UsageError):
    template = "repository {url} has no snapshots yet; run `keepflow backup SOURCE {url}` first"


class DamagedManifestError(KeepflowError):
    """A manifest under ``snapshots/`` cannot be read; never skipped silently."""

    template = ("{what} cannot be read (snapshots/{name} in {url}: {reason}); "
                "copy it back from a replica, or remove that file to forget the snapshot")
    exit_code = EXIT_FAILED


class TargetError(UsageError):
    template = "cannot restore into {target}: {reason}"


class RepositoryWriteError(KeepflowError):
    """Writing to the repository failed.

    Distinct from the source-side errors that skip one file: a failed write
    must fail the whole batch (Prefect may retry it), because files already
    hashed into the lost pack would otherwise be committed without their data.
    """


class RepositoryFullError(RepositoryWriteError):
    """The repository's storage has no space (or quota) left: never retried.

    Raised instead of RepositoryWriteError whenever ENOSPC or EDQUOT is in the
    cause chain; retrying cannot help, and the user needs this line at once.
    """

    exit_code = EXIT_NO_SPACE


class IntegrityError(KeepflowError):
    template = "{what}: stored data does not match its hash {hash}; restore it from a replica with --fallback"


class UnindexedBlobsError(KeepflowError):
    """A commit would reference blobs the index does not hold: refuse it.

    Raised by the commit guard of a backup (no manifest is written) and of a
    prune's index compaction (the old index files are kept, nothing deleted).
    """

    template = ("{what}: {count} blob(s) referenced by {files} file(s) are not in the repository index "
                "(first: {paths}); nothing was committed. Run `keepflow repair index {url}`, then try again")
    exit_code = EXIT_FAILED


class PackFormatError(KeepflowError):
    """A file under ``packs/`` is not a well-formed pack (see tasks/core/pack.py).

    ``keepflow repair index`` reports such files as unreadable and leaves them alone.
    """

    template = "{key} is not a keepflow pack: {reason}"
    exit_code = EXIT_FAILED


class PasswordMissingError(RepositoryError):
    """No password source is set (tasks/core/passwords.py lists them in order)."""

    template = ("no password for repository {url}: set KEEPFLOW_PASSWORD, give a file whose first line "
                "is the password with KEEPFLOW_PASSWORD_FILE or --password-file, set "
                "KEEPFLOW_PASSWORD_COMMAND to a command that prints it, or run from a terminal to be asked "
                "(a flow: password='secret/NAME', a Prefect Secret block)")
    exit_code = EXIT_NO_REPO


class WrongPasswordError(RepositoryError):
    """No key file under ``keys/`` unwraps the master key with the password given; nothing was written."""

    template = ("wrong password for {url}: no key file in keys/ opens with it; check which source gave it, the "
                "first set of: --password-file or the flow's Secret block, KEEPFLOW_PASSWORD, "
                "KEEPFLOW_PASSWORD_FILE, KEEPFLOW_PASSWORD_COMMAND, the terminal; nothing was written")
    exit_code = EXIT_NO_REPO


class PasswordSourceError(RepositoryError):
    """The password source that is set failed (unreadable file, failing command, mismatch at the prompt).

    ``reason`` never quotes the password, the file's contents or the command's output.
    """

    template = "cannot get the password from {source}: {reason}"
    exit_code = EXIT_NO_REPO


class KeyFileError(RepositoryError):
    """keys/ cannot open the repository for a reason other than the password (none there, all damaged)."""

    template = "{what}"
    exit_code = EXIT_NO_REPO


class BlobFormatError(KeepflowError):
    """A stored blob, index file or manifest fails authentication or decoding (format 2)."""

    template = "{key} is damaged: {reason}"
    exit_code = EXIT_FAILED

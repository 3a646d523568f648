"""Which failures are worth a Prefect retry.

Transient storage trouble (timeouts, connection resets, 5xx mapped to OSError)
is retried; anything the user must fix (bad credentials, missing bucket, a
keepflow usage or repository error, corrupt data) is not, because retrying
would only delay the one-line error the user needs.
"""

from __future__ import annotations

from keepflow.tasks.core import storage
from keepflow.tasks.core.errors import KeepflowError, RepositoryFullError, RepositoryWriteError, StorageError

PERMANENT = (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeepflowError)


def is_transient(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    if isinstance(exc, RepositoryFullError) or storage.is_no_space(exc):
        return False                     # more attempts cannot make space
    if isinstance(exc, RepositoryWriteError):
        cause = exc.__cause__
        return cause is None or is_transient(cause) or storage.classify(cause) == "unreachable"
    if isinstance(exc, StorageError):
        return getattr(exc, "kind", "") == "unreachable"    # a server may come back; credentials will not
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return storage.is_storage_failure(exc) and storage.classify(exc) in ("unreachable", "other")


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn`` for Prefect tasks."""
    try:
        state.result()
    except BaseException as exc:  # the task's own exception is re-raised here
        return is_transient(exc)
    return False

"""A format 2 repository's key files (``keys/``) and this process's unlocked master keys.

The master key never leaves memory: it is unwrapped from a key file with the
password (passwords.py says where that comes from) and kept here per
repository id, so the batches of one run in one process (threads, or the
tasks of one Dask worker) derive it once. Replicas share the primary's id and
key files, so one unlock serves both. Nothing here is ever logged, returned
to Prefect or written anywhere but a key file.

Key files are write-once and named by the BLAKE3 of their bytes
(``keys/<64 hex>``); ``add`` writes a new one, ``remove`` deletes one (never
the last), ``passwd`` is add-then-remove: no key file is rewritten in place.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3

from . import crypto, storage
from .errors import KeyFileError, UsageError, WrongPasswordError

if TYPE_CHECKING:
    from .repository import Repository

_HEX64 = re.compile(r"[0-9a-f]{64}")
_masters: dict[str, bytes] = {}
_pending: dict[str, threading.Event] = {}     # repository id -> an unlock_ahead still deriving
_lock = threading.Lock()


def kdf_params() -> dict | None:
    """KDF parameters for new key files from ``KEEPFLOW_KDF`` (None: the defaults).

    ``KEEPFLOW_KDF="argon2id:t=1,m=1024,p=1"`` or ``"scrypt:n=1024,r=8,p=1"``:
    for tests and very small machines; every key file records its own
    parameters, so opening needs no setting.
    """
    spec = os.environ.get("KEEPFLOW_KDF", "").strip()
    if not spec:
        return None
    try:
        kdf, _, rest = spec.partition(":")
        params: dict[str, str | int] = {"kdf": kdf}
        for item in filter(None, rest.split(",")):
            name, _, value = item.partition("=")
            params[name.strip()] = int(value)
        needed = {"argon2id": {"t", "m", "p"}, "scrypt": {"n", "r", "p"}}[kdf]
        if set(params) - {"kdf"} != needed:
            raise ValueError
    except (ValueError, KeyError):
        raise UsageError(f"KEEPFLOW_KDF={spec!r} is not a KDF setting; use e.g. 'argon2id:t=4,m=131072,p=4' "
                         "or 'scrypt:n=131072,r=8,p=1'") from None
    return params


def forget(repo_id: str | None = None) -> None:
    """Drop unlocked master keys (all, or one repository's)."""
    with _lock:
        if repo_id is None:
            _masters.clear()
        else:
            _masters.pop(repo_id, None)


def unlocked() -> dict[str, bytes]:
    """The master keys unlocked in this process, by repository id (for batch_processes' children)."""
    with _lock:
        return dict(_masters)


def install(masters: dict[str, bytes]) -> None:
    """Take master keys unlocked by another process of this run (batch_processes: the flow process's)."""
    with _lock:
        _masters.update(masters)


def subkeys(repo: Repository) -> crypto.Subkeys:
    """The repository's subkeys, unlocking it with the process's password when needed."""
    if not repo.encrypted:
        return crypto.Subkeys.derive(crypto.ZERO_KEY, repo.config.id, encrypted=False)
    with _lock:
        master = _masters.get(repo.config.id)
        pending = _pending.get(repo.config.id)
    if master is None and pending is not None:
        pending.wait()             # unlock_ahead is deriving this very key: one KDF run, not two
        with _lock:
            master = _masters.get(repo.config.id)
    if master is None:
        from . import passwords

        master = unlock(repo, passwords.get_password(repo.url))
    return crypto.Subkeys.derive(master, repo.config.id)


def unlock_ahead(url: str, storage_options: dict | None = None) -> threading.Thread | None:
    """Start deriving the master key of the repository at ``url`` on a background thread.

    Why: the KDF (Argon2id, ~0.5 s) releases the GIL, so a command that is
    about to spend a second importing Prefect can have the key ready by the
    time its flow opens the repository. The repository's config is read and
    the password found here, in the caller's thread, so that ``subkeys``
    (which waits for a derivation in flight rather than starting a second)
    sees it pending from the moment this returns. Best effort: a repository
    that is not there or not encrypted, and a password that is missing,
    needs a prompt or is wrong, are left alone (None, or a thread that fails
    quietly), for the flow's own unlock to report exactly as without this.
    """
    from . import passwords
    from .repository import Repository

    try:
        repo = Repository.open(url, storage_options, unlock=False)
        if not repo.encrypted:
            return None
        password = passwords.get_password(repo.url, interactive=False)
    except Exception:
        return None
    repo_id = repo.config.id
    with _lock:
        if repo_id in _masters or repo_id in _pending:
            return None
        event = _pending[repo_id] = threading.Event()

    def derive() -> None:
        try:
            unlock(repo, password)
        except Exception:
            pass
        finally:
            with _lock:
                _pending.pop(repo_id, None)
            event.set()

    thread = threading.Thread(target=derive, name="keepflow-unlock-ahead", daemon=True)
    thread.start()
    return thread


@dataclass
class KeyFile:
    name: str                  # the B3 hex of its bytes (the file name under keys/)
    data: bytes
    body: dict | None          # parsed JSON; None when damaged
    problem: str = ""

    @property
    def created(self) -> str:
        return (self.body or {}).get("created", "")

    def describe(self) -> dict:
        b = self.body or {}
        return {"id": self.name[:16], "name": self.name, "created": b.get("created"), "kdf": b.get("kdf"),
                **{k: b[k] for k in ("t", "m", "p", "n", "r") if k in b}, "problem": self.problem or None}


def key_files(repo: Repository) -> list[KeyFile]:
    """Every file under keys/, newest first; damaged ones carry ``problem``."""
    out = []
    try:
        listing = storage.list_files(repo.fs, repo.path("keys"))
    except FileNotFoundError:
        listing = []
    for info in listing:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if not _HEX64.fullmatch(name):
            continue      # a writer's temporary (or foreign) name: never a key file
        data = repo.fs.cat_file(repo.path(repo.key_file_key(name)))
        kf = KeyFile(name, data, None)
        if blake3.blake3(data).hexdigest() != name:
            kf.problem = "its name is not the BLAKE3 of its bytes (damaged)"
        else:
            try:
                kf.body = crypto.parse_key_file(data)
            except (ValueError, UnicodeDecodeError):
                kf.problem = "not a key file (damaged)"
        out.append(kf)
    out.sort(key=lambda k: k.created, reverse=True)
    return out


def unlock(repo: Repository, password: str) -> bytes:
    """The master key from the first key file ``password`` opens; WrongPasswordError when none does."""
    files = key_files(repo)
    damaged = [k for k in files if k.problem]
    for kf in files:
        if kf.problem:
            continue
        master = crypto.unwrap_key_file(kf.data, password, repo.config.id)
        if master is not None:
            with _lock:
                _masters[repo.config.id] = master
            return master
    if not files:
        raise KeyFileError(f"{repo.url} is encrypted but has no key file under keys/; restore keys/ from a "
                           "replica (replicas hold the same key files)")
    extra = (f"; {len(damaged)} damaged key file(s): " + ", ".join(f"keys/{k.name[:16]}… ({k.problem})"
                                                                 for k in damaged[:3])) if damaged else ""
    error = WrongPasswordError(url=repo.url)
    if extra:
        error = WrongPasswordError(str(error) + extra, url=repo.url)
    raise error


def _write_key_file(repo: Repository, data: bytes) -> str:
    name = blake3.blake3(data).hexdigest()
    try:
        repo.fs.makedirs(repo.path("keys"), exist_ok=True)
        storage.write_once(repo.fs, repo.path(repo.key_file_key(name)), data)
    except Exception as exc:
        if not storage.is_storage_failure(exc):
            raise
        raise storage.write_failure(f"cannot write keys/{name[:16]}… to {repo.url}: {exc}", exc) from exc
    return name


def create_first_key(repo: Repository, password: str | None) -> crypto.Subkeys:
    """At init: a new master key, wrapped under ``password`` (asked when None) in the first key file."""
    if not repo.config.encrypted:
        return crypto.Subkeys.derive(crypto.ZERO_KEY, repo.config.id, encrypted=False)
    if password is None:
        from . import passwords

        password = passwords.get_password(repo.url, confirm=True)
    master = crypto.new_master_key()
    _write_key_file(repo, crypto.make_key_file(master, repo.config.id, password, kdf_params()))
    with _lock:
        _masters[repo.config.id] = master
    return crypto.Subkeys.derive(master, repo.config.id)


def add_key(repo: Repository, new_password: str) -> str:
    """A new key file for ``new_password`` (the repository must be unlocked); returns its name."""
    master = _master_of(repo)
    return _write_key_file(repo, crypto.make_key_file(master, repo.config.id, new_password, kdf_params()))


def remove_key(repo: Repository, name_prefix: str) -> str:
    """Remove the key file whose name starts with ``name_prefix``; never the last readable one."""
    files = key_files(repo)
    hits = [k for k in files if k.name.startswith(name_prefix)]
    if not hits:
        raise UsageError(f"no key file under keys/ starts with {name_prefix!r}; `keepflow key list {repo.url}` "
                         "shows them")
    if len(hits) > 1:
        raise UsageError(f"{len(hits)} key files start with {name_prefix!r}; give more characters")
    readable = [k for k in files if not k.problem]
    if not hits[0].problem and len(readable) <= 1:
        raise UsageError(f"keys/{hits[0].name[:16]}… is the repository's last key; add another with "
                         f"`keepflow key add {repo.url}` first (without a key nobody can open it)")
    repo.fs.rm_file(repo.path(repo.key_file_key(hits[0].name)))
    return hits[0].name


def current_key_name(repo: Repository, password: str) -> str | None:
    """The name of the key file ``password`` opens (None when none)."""
    for kf in key_files(repo):
        if not kf.problem and crypto.unwrap_key_file(kf.data, password, repo.config.id) is not None:
            return kf.name
    return None


def _master_of(repo: Repository) -> bytes:
    repo.unlock()
    with _lock:
        return _masters[repo.config.id]


def describe(repo: Repository) -> list[dict]:
    return [k.describe() for k in key_files(repo)]


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)

"""Repository leases: who is working on a repository right now.

A lease is a small JSON file ``locks/<kind>-<uuid>.json`` holding the kind
(``backup``, ``prune``), the source for backups, host, pid, and an expiry
time. The holder refreshes it (a daemon thread rewrites the expiry every
``ttl/3``), so a lease whose expiry has passed belongs to a process that
died: it is ignored by everyone and removed by ``keepflow unlock``. On the
holder's own host a lease is dead as soon as its process is (no such pid, a
zombie, or a pid reused by a later process; liveness.py), without waiting
for the expiry.

Rules (checked after writing our own lease, then reading the others, so two
processes starting at the same moment always see each other):

* two backups of the same source and host never overlap;
* backups of different sources share the repository freely;
* prune's deletion phase (``prune`` lease) excludes backups: a backup that
  started before could rely on blobs being deleted, one that starts during
  could load an index that still lists them.

Writes. Our lease file is created create-only (``storage.write_once``: a
link on local disk, a rename that never replaces on SFTP, a conditional PUT
on S3 and Azure) and refreshed by an atomic replace
(``storage.replace_atomically``), so a reader sees a whole lease or none,
never a truncated one it would skip as "not a lease".

Exclusion comes from the order, write then list, not from the name: of two
runs starting at the same moment the one that lists last sees the other; at
worst both see each other and both back off (exit 11, or another try with
``--retry-lock``). That holds wherever a listing after a write shows it:
local disk, SFTP, AWS S3 (consistent listings since December 2020), Azure
Blob, SeaweedFS. Conditional create adds nothing here, since every lease has
its own name. A fixed name per source and host
(``locks/backup-<hash>.json``) claimed create-only would let exactly one of
two racers win instead of both backing off, but it does not fit the rules:
a lease whose holder died would then block the name until someone deleted
or replaced it, and taking it over safely needs a compare-and-swap on its
ETag (``If-Match``), which s3fs and adlfs do not expose and many S3 servers
lack: without it two runs taking over the same stale lease can each remove
the other's fresh claim and both run; the holder's refreshes would need the
same guard; and prune must see every backup, so the listing stays anyway.
Where a server's listings lag behind its writes, the grace period of
two-phase garbage collection is the second line of defence.

Format 2 (ARCHITECTURE.md, "### Leases, marks"): the same name and JSON, but
an encrypted repository stores ``crypto.seal(keys, LEASE, JSON,
random_salt=True)`` (a lease names the source path and host; the salt is
random because the file is replaced while held). A lease that does not
authenticate is treated like an unreadable lease in format 1: it is no
lease, so it blocks nobody and ``unlock`` leaves it alone.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import crypto, liveness, storage
from .errors import KeepflowError

if TYPE_CHECKING:
    from .repository import Repository

DEFAULT_TTL = 30 * 60          # seconds; refreshed every TTL/3 while held


class LeaseConflictError(KeepflowError):
    template = ("{what} is running (lease {lease} on {host}, pid {pid}, expires {expires}); "
                "wait for it, or if it died run `keepflow unlock {repo}`")
    exit_code = 11


@dataclass
class Lease:
    kind: str
    id: str
    host: str
    pid: int
    created: str
    expires: str
    source: str | None = None
    key: str = ""

    @property
    def expired(self) -> bool:
        return dt.datetime.fromisoformat(self.expires) < dt.datetime.now(dt.UTC)

    def holder_is_dead(self) -> bool:
        """True when the holder ran on this host and its process is gone: no
        such pid, a zombie (killed, not yet reaped), or the pid now belongs to a
        process started after the lease was written (liveness.is_gone)."""
        if self.host != socket.gethostname():
            return False
        try:
            created = dt.datetime.fromisoformat(self.created).timestamp()
        except (TypeError, ValueError):
            created = None
        return liveness.is_gone(self.pid, started_by=created)

    @property
    def live(self) -> bool:
        return not self.expired and not self.holder_is_dead()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _sealed(repo: Repository) -> bool:
    return repo.version >= 2 and repo.encrypted


def encode_lease(repo: Repository, data: dict) -> bytes:
    """A lease file's bytes: JSON, sealed with the lease key in an encrypted repository."""
    body = json.dumps(data).encode()
    return crypto.seal(repo.keys, crypto.LEASE, body, random_salt=True) if _sealed(repo) else body


def decode_lease(repo: Repository, raw: bytes) -> dict:
    """The JSON of a lease file; ValueError when it is not one (format 2: also when it does not authenticate)."""
    if _sealed(repo):
        try:
            raw = crypto.unseal(repo.keys, crypto.LEASE, raw)
        except crypto.AuthenticationFailed:
            raise ValueError("the lease does not authenticate") from None
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a lease")
    return data


def list_leases(repo: Repository) -> list[Lease]:
    leases = []
    for info in storage.list_files(repo.fs, repo.path("locks")):
        name = info["name"]
        if not name.endswith(".json"):
            continue
        try:
            data = decode_lease(repo, repo.fs.cat_file(name))
            data.pop("key", None)
            leases.append(Lease(**data, key=name))
        except (FileNotFoundError, ValueError, TypeError):
            continue  # released meanwhile, or not ours
    return leases


def conflicts(mine: Lease, others: list[Lease]) -> list[Lease]:
    found = []
    for other in others:
        if other.id == mine.id or not other.live:
            continue
        if mine.kind == "backup" and other.kind == "backup":
            if other.source == mine.source and other.host == mine.host:
                found.append(other)
        elif "prune" in (mine.kind, other.kind):
            found.append(other)
    return found


class Holder:
    """Acquire on enter, refresh in the background, release on exit."""

    def __init__(self, repo: Repository, kind: str, source: str | None = None, ttl: int = DEFAULT_TTL) -> None:
        self.repo, self.ttl = repo, ttl
        now = _now()
        self.lease = Lease(kind=kind, id=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                           created=now.isoformat(), expires=(now + dt.timedelta(seconds=ttl)).isoformat(),
                           source=source)
        self.path = repo.path("locks", f"{kind}-{self.lease.id}.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, first: bool = False) -> None:
        data = asdict(self.lease)
        data.pop("key")
        body = encode_lease(self.repo, data)
        self.repo.fs.makedirs(self.repo.path("locks"), exist_ok=True)
        if not first:
            storage.replace_atomically(self.repo.fs, self.path, body)
        elif not storage.write_once(self.repo.fs, self.path, body):
            # A random 128-bit name that exists: never replace someone's lease.
            raise FileExistsError(f"lease {self.path} exists already")

    def acquire(self) -> Holder:
        self._write(first=True)
        try:
            clash = conflicts(self.lease, list_leases(self.repo))
        except BaseException:
            # Ctrl-C (or a storage error) between writing our lease and
            # checking the others: release what we hold, never leave it behind.
            self.release()
            raise
        if clash:
            self.release()
            other = clash[0]
            both_backups = other.kind == "backup" and self.lease.kind == "backup"
            what = ("another backup of " + str(other.source)) if both_backups else f"a {other.kind}"
            raise LeaseConflictError(what=what, lease=other.id[:8], host=other.host, pid=other.pid,
                                     expires=other.expires[:19], repo=self.repo.url)
        self._thread = threading.Thread(target=self._refresh, name=f"keepflow-lease-{self.lease.kind}", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.lease.expires = (_now() + dt.timedelta(seconds=self.ttl)).isoformat()
            try:
                self._write()
            except OSError:
                pass  # transient; the next refresh tries again before expiry

    def release(self) -> None:
        self._stop.set()
        # A refresh in flight would write the lease again after we removed it.
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        try:
            self.repo.fs.rm_file(self.path)
        except (FileNotFoundError, OSError):
            pass

    def __enter__(self) -> Holder:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def wait_for(repo: Repository, kind: str, source: str | None = None, timeout: float = 0.0, poll: float = 2.0) -> Holder:
    """Acquire, retrying on conflict until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Holder(repo, kind, source).acquire()
        except LeaseConflictError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(poll)


def unlock(repo: Repository, force_live: bool = False) -> tuple[list[Lease], list[Lease]]:
    """Remove stale leases; returns (removed, live ones left alone)."""
    removed, kept = [], []
    for lease in list_leases(repo):
        if lease.live and not force_live:
            kept.append(lease)
            continue
        try:
            repo.fs.rm_file(lease.key)
            removed.append(lease)
        except FileNotFoundError:
            pass
    return removed, kept


def backup_lease(repo_url: str, source: str, storage_options: dict[str, Any] | None = None,
                 wait: float = 0.0) -> Holder:
    """The lease a backup holds from planning to commit (creates the repository if needed).

    ``wait``: seconds to keep retrying while a conflicting run holds a lease.
    """
    from .repository import Repository

    repo = Repository.open(repo_url, storage_options, create=True)
    return wait_for(repo, "backup", source, timeout=wait, poll=min(10.0, max(0.5, wait / 20)))

"""Is the process that left this behind still running?

keepflow leaves traces that name the process that made them: repository
leases (``locks/``, lease.py), the host-local run registry (runs.py), and
temporary files (a local repository's ``tmp/``, and ``.kf-tmp-`` names in a
restore target, restore_writer.py). A SIGKILL, an OOM kill or a power loss
gives the process no chance to remove them. Timeouts (a lease's expiry, the
one-hour rule for temporaries) clean up eventually, but a process on the same
host can do better: if the writer is gone, its traces can go at once.

A process is identified by ``(host, boot, pid, start)``: ``start`` is its
start time in clock ticks after boot (field 22 of ``/proc/<pid>/stat``) and
``boot`` the first 8 hex digits of ``/proc/sys/kernel/random/boot_id``. A
pid alone is not enough: pids are reused, and after a reboot (the power-loss
case) a new process may have the old pid.

``is_gone`` decides, on Linux, from ``/proc``:

* another boot than ours: gone;
* no ``/proc/<pid>``: gone;
* state ``Z`` (zombie: exited, not yet reaped by its parent) or ``X``: gone.
  Issue 11: a killed backup whose parent had not yet called ``wait()`` still
  counted as a live lease holder, because ``kill(pid, 0)`` succeeds on a
  zombie;
* a start time other than the recorded one: the pid now belongs to another
  process: gone. Where only a time by which the holder had certainly started
  is known (a lease records its creation time, not a start time: adding a
  field would make older keepflow versions ignore the lease), a process that
  started more than ``START_SLACK_S`` after that time cannot be the holder.

Without ``/proc`` (macOS, BSD) only ``kill(pid, 0)`` is available: absent
means gone, a zombie or a reused pid counts as alive (the safe error).

Another host: we cannot tell, and callers fall back to their timeouts; a
pid means nothing on another machine. Processes in another pid namespace that
share our host name (containers) look gone. The harm is bounded: such a lease
is ignored before its expiry, and a temporary file removed under a live writer
makes that writer's link or rename fail, which fails its batch (retried)
rather than losing data.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

# A process's wall-clock start is computed as btime (/proc/stat, whole seconds)
# + start ticks, and btime moves when the clock is stepped (NTP after boot):
# good to a second on a steady clock, off by the size of any step since. A
# minute covers ordinary steps; a pid reused within that minute is left to
# the lease's expiry. Reporting a live holder dead is the error to avoid.
START_SLACK_S = 60.0
_NO_PROC = not os.path.exists("/proc/self/stat")


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    start: int | None      # clock ticks after boot; None where /proc is missing
    boot: str | None       # 8 hex digits of the boot id; None where unknown

    def tag(self) -> str:
        """``<host>-<pid>-<start>-<boot>``: safe in a file name, parsed by ``parse_tag``."""
        return f"{_safe_host(self.host)}-{self.pid}-{self.start or 0}-{self.boot or '0' * 8}"


_TAG = r"(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-(?P<start>\d+)-(?P<boot>[0-9a-f]{8})"
TAG_PATTERN = re.compile(_TAG)
_TAG_RE = re.compile(rf"^{_TAG}$")


def _safe_host(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", host) or "_"


def parse_tag(text: str) -> ProcessId | None:
    m = _TAG_RE.match(text)
    if not m:
        return None
    start, boot = int(m["start"]), m["boot"]
    return ProcessId(m["host"], int(m["pid"]), start or None, None if boot == "0" * 8 else boot)


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of ``pid`` from /proc, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return "?", -1         # /proc mounted with hidepid: it exists, details hidden
    # The command name (field 2) is in parentheses and may itself contain
    # spaces and parentheses: the fields after the *last* ')' are fixed.
    rest = raw.rpartition(")")[2].split()
    return rest[0], int(rest[19])


_me: tuple[int, ProcessId] | None = None


def this_process() -> ProcessId:
    """Our identity (recomputed after a fork)."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:
        found = None if _NO_PROC else proc_stat(pid)
        _me = (pid, ProcessId(socket.gethostname(), pid, found[1] if found else None, boot_id()))
    return _me[1]


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def is_gone(pid: int, start: int | None = None, boot: str | None = None,
            started_by: float | None = None) -> bool:
    """True when the process ``pid`` of this host (recorded with ``start`` ticks,
    ``boot`` id, or known to have been running at epoch time ``started_by``)
    no longer exists. See the module docstring for the rules."""
    if pid <= 0:
        return False               # not a process id (kill() would address a group)
    if _NO_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False           # exists, owned by someone else
        return False
    ours = boot_id()
    if boot and ours and boot != ours:
        return True
    found = proc_stat(pid)
    if found is None:
        # With /proc mounted hidepid=2 other users' processes are invisible
        # there; kill(pid, 0) still tells "no such process" from "not yours".
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    state, ticks = found
    if state == "?":
        return False
    if state in ("Z", "X", "x"):
        return True
    if start is not None and ticks != start:
        return True
    if started_by is not None:
        btime = _boot_time()
        if btime is not None and btime + ticks / os.sysconf("SC_CLK_TCK") > started_by + START_SLACK_S:
            return True
    return False


def gone(ident: ProcessId) -> bool | None:
    """True/False for a process of this host; None for another host (cannot tell)."""
    if _safe_host(ident.host) != _safe_host(socket.gethostname()):
        return None
    return is_gone(ident.pid, ident.start, ident.boot)


# -- temporary files named after their writer ---------------------------------------

STALE_AFTER_S = 3600.0     # gc's rule for temporaries whose writer cannot be judged


def stale(writer: ProcessId | None, mtime_s: float, now: float | None = None) -> bool:
    """Whether a temporary file may be removed: at once when its writer is known
    to be gone, never while it is known to be alive, after ``STALE_AFTER_S``
    when it cannot be judged (another host, or a name without a writer)."""
    verdict = gone(writer) if writer is not None else None
    if verdict is not None:
        return verdict
    return (now if now is not None else time.time()) - mtime_s > STALE_AFTER_S


# A local repository's tmp/ holds large blobs while they are copied and hashed
# (store._store_large_local): up to a GiB each, so a dead writer's file is
# worth removing at the next backup rather than an hour later.
_REPO_TMP_RE = re.compile(rf"^(?P<writer>{_TAG})-[0-9a-f]{{32}}$")


def repo_tmp_name() -> str:
    """File name for a temporary in a local repository's ``tmp/``."""
    return f"{this_process().tag()}-{uuid.uuid4().hex}"


def remove_dead_repo_temporaries(repo_url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Remove the files in a local repository's ``tmp/`` whose writer ran on
    this host and is gone; returns how many. Everything else there (other
    hosts, live writers, other names) keeps gc's one-hour rule. Never raises
    for storage problems: the backup that calls this has better things to
    report."""
    from . import storage

    try:
        fs, root = storage.open_url(repo_url, storage_options)
    except Exception:
        return 0
    if not storage.is_local(fs):
        return 0          # tmp/ is used by local repositories only
    removed = 0
    for entry in dead_writers_entries(os.path.join(root, "tmp"), _REPO_TMP_RE, dirs=False):
        try:
            os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


def dead_writers_entries(folder: str, pattern: re.Pattern, dirs: bool) -> list[os.DirEntry]:
    """The files (or folders, with ``dirs``) in the local ``folder`` whose name
    matches ``pattern``, with the writer's tag in its group ``writer``, and
    whose writer ran on this host and is gone. Never raises."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = []
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not (entry.is_dir(follow_symlinks=False) if dirs else entry.is_file(follow_symlinks=False)):
            continue
        writer = parse_tag(m.group("writer"))
        if writer is not None and gone(writer):
            found.append(entry)
    return found

"""The commands that run no flow: ``snapshots``, ``ls``, ``diff``, ``replicas``, ``stats``, ``key``.

They call ``keepflow.tasks.core`` directly: no flow run, no Prefect import, no
pandas, an answer in well under a second (``keepflow snapshots`` ~0.3 s;
tests/test_analysis.py checks ``stats``). Everything is imported inside the
command so that building the parser stays cheap.

``stats`` reads only the snapshot facts (format 2: each manifest's small
encrypted facts block; format 1: the Parquet footers), the index and a
listing of ``packs/`` (and format 1's ``objects/``), so it answers quickly
even for a long history; the richer per-snapshot figures are in
``keepflow.tasks.core.analysis`` and the notebooks. ``replicas`` reads
listings only and opens the primary without its password.

``key list|add|remove|passwd``: every password has its own key file under
``keys/`` wrapping the one master key (ARCHITECTURE.md, "Keys and
passwords"). The current password comes from the usual sources
(``--password-file``, ``KEEPFLOW_PASSWORD``...); the *new* one for ``add`` and
``passwd`` from ``--new-password-file FILE`` or ``KEEPFLOW_NEW_PASSWORD``, else
a terminal prompt (asked twice). No key file is ever rewritten in place:
``passwd`` writes the new file, then removes the old one.
"""

from __future__ import annotations

import os
import sys

from keepflow.flows.cli import output
from keepflow.tasks.core.errors import EXIT_PARTIAL


def cmd_snapshots(args) -> int:
    from keepflow.tasks.core.repository import Repository
    from keepflow.tasks.core.snapshots import list_snapshots

    damaged: list = []
    snaps = list_snapshots(Repository.open(args.repo, args.storage_options), damaged)
    # Damaged manifests are never left out silently: one warning line each, exit 3.
    for d in damaged:
        print(f"keepflow: warning: {d.error(args.repo)}", file=sys.stderr)
    status = EXIT_PARTIAL if damaged else 0
    if args.json:
        output.print_json([dict(s.__dict__) for s in snaps])
    else:
        output.print_snapshots(snaps, damaged)
    return status


def cmd_ls(args) -> int:
    from keepflow.tasks.core import manifest, snapshots
    from keepflow.tasks.core.repository import Repository

    repo = Repository.open(args.repo, args.storage_options)
    info = snapshots.resolve(repo, args.snapshot)
    table = manifest.read_manifest(repo, info,
                                   columns=["path", "type", "size", "mtime_ns", "mode", "hash", "link_target"])
    if args.json:
        output.print_json({"snapshot": info.id, "entries": table.to_pylist()})
    else:
        output.print_ls(table)
    return 0


def cmd_diff(args) -> int:
    from keepflow.tasks.core import snapshot_diff
    from keepflow.tasks.core.repository import Repository

    repo = Repository.open(args.repo, args.storage_options)
    result = snapshot_diff.compare(repo, args.snap_a, args.snap_b)
    if args.json:
        output.print_json(result)
    else:
        output.print_diff(result)
    return 0


def cmd_replicas(args) -> int:
    from keepflow.tasks.core import replicate as core_replicate
    from keepflow.tasks.core.repository import Repository

    primary = Repository.open(args.repo, args.storage_options, unlock=False)   # listings only: no password
    statuses = [core_replicate.status(primary, url) for url in args.replicas]
    if args.json:
        output.print_json([s.to_dict() for s in statuses])
    else:
        output.print_replicas(statuses)
    return 0


def cmd_stats(args) -> int:
    from keepflow.tasks.core.analysis import repository_summary
    from keepflow.tasks.core.errors import UsageError

    if args.last < 1:
        raise UsageError(f"--last must be at least 1, not {args.last}")
    s = repository_summary(args.repo, last=args.last, storage_options=args.storage_options)
    if args.json:
        output.print_json(s)
    else:
        output.print_stats(s)
    return 0


def cmd_key(args) -> int:
    from keepflow.tasks.core import keyring, passwords
    from keepflow.tasks.core.errors import UsageError
    from keepflow.tasks.core.repository import Repository

    repo = Repository.open(args.repo, args.storage_options)
    if not repo.encrypted:
        raise UsageError(f"{args.repo} is not encrypted (format {repo.version}, encryption "
                         f"{repo.config.encryption or 'none'}): it has no keys")
    action = args.key_command
    out: dict = {"repository": args.repo, "action": action}
    if action == "list":
        out["keys"] = keyring.describe(repo)
        current = keyring.current_key_name(repo, passwords.get_password(args.repo))
        for k in out["keys"]:
            k["current"] = k["name"] == current
    elif action == "add":
        out["added"] = keyring.add_key(repo, _new_password(args, args.repo))[:16]
    elif action == "remove":
        out["removed"] = keyring.remove_key(repo, args.key_id)[:16]
    elif action == "passwd":
        old = keyring.current_key_name(repo, passwords.get_password(args.repo))
        new = keyring.add_key(repo, _new_password(args, args.repo))
        if old is not None and old != new:
            keyring.remove_key(repo, old)
        out["added"], out["removed"] = new[:16], (old or "")[:16]
    if args.json:
        output.print_json(out)
    else:
        output.print_key(out)
    return 0


def _new_password(args, repo_url: str) -> str:
    from keepflow.tasks.core import passwords
    from keepflow.tasks.core.errors import PasswordSourceError

    if args.new_password_file:
        return passwords.read_password_file(args.new_password_file, origin="--new-password-file")
    value = os.environ.get("KEEPFLOW_NEW_PASSWORD")
    if value:
        return value
    if not sys.stdin.isatty():
        raise PasswordSourceError(source="the new password", reason="give it with --new-password-file FILE or "
                                                                     "KEEPFLOW_NEW_PASSWORD, or run from a terminal")
    return passwords.prompt_new(f"new password for {repo_url}")

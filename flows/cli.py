"""The ``keepflow`` command.

Read-only commands (``snapshots``, ``ls``, ``diff``) call ``keepflow.tasks.core``
directly: no flow run, no Prefect import, an answer in well under a second.
Commands that change data (``backup``, ``restore``) run a Prefect flow, so
every such run is in Prefect's history.

Output: human-readable text on stdout, progress bars on stderr when it is a
terminal, ``--json`` for one JSON object on stdout and nothing else. Errors a
user can cause print one line (``keepflow: error: ...``) and exit non-zero:
0 ok, 1 failed / no snapshot written, 2 usage, 3 snapshot written with
skipped files, 10 no usable repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from keepflow.flows.cli_keys import add_key_parser, cmd_key
from keepflow.flows.cli_server import add_server_parser, cmd_server
from keepflow.flows.cli_stats import add_stats_parser, cmd_stats
from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_NO_SPACE, EXIT_PARTIAL, EXIT_USAGE, KeepflowError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        self.exit(EXIT_USAGE, f"keepflow: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="keepflow", description="Backup and restore as Prefect flows.")
    p.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, help_text):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        return sp

    sp = add("init", "create an empty repository (format 2: encrypted and compressed, unless told otherwise)")
    sp.add_argument("repo", metavar="REPO", help="path or fsspec URL")
    sp.add_argument("--format", type=int, choices=[1, 2], default=2,
                    help="repository format: 2 (default; encrypted, compressed, content-defined chunks) or 1 "
                         "(plaintext, whole files, as keepflow before 2026-12)")
    sp.add_argument("--encryption", choices=["aes-256-gcm", "none"], default="aes-256-gcm",
                    help="format 2 only: 'none' keeps manifests and index plain Parquet that DuckDB reads with no "
                         "key, and needs no password (default: aes-256-gcm)")
    sp.add_argument("--compression", choices=["auto", "off", "fastest", "max"], default="auto",
                    help="format 2 only: the default zstd mode of backups (auto: level 3, raw when it does not "
                         "pay; fastest: 1; max: 9; off)")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("backup", "back up SOURCE into REPO (creates the repository if needed)")
    sp.add_argument("source", metavar="SOURCE", help="folder or fsspec URL to back up")
    sp.add_argument("repo", metavar="REPO", help="repository path or fsspec URL")
    sp.add_argument("--tag", action="append", default=[], help="tag the snapshot (repeatable)")
    sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="gitignore-style pattern to leave out (repeatable)")
    sp.add_argument("--rehash", action="store_true", help="full backup: read every file, trust no metadata")
    sp.add_argument("--compression", choices=["auto", "off", "fastest", "max"], default=None,
                    help="format 2: zstd mode for this backup (default: the repository's, set at init)")
    sp.add_argument("--no-xattrs", dest="xattrs", action="store_false",
                    help="do not store extended attributes and ACLs (saves one listxattr per entry)")
    sp.add_argument("--parent", metavar="ID", help="snapshot to diff against (default: latest of this source and host)")
    sp.add_argument("--dry-run", action="store_true", help="report what would be stored, store nothing")
    sp.add_argument("--retry-lock", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to this long for a conflicting run's lease instead of failing")
    sp.add_argument("--replicate-to", action="append", default=[], metavar="URL",
                    help="after the backup, bring this replica up to date (repeatable)")
    sp.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    _storage_options_arg(sp)
    _cluster_args(sp, work_dir=True)

    sp = add("restore", "restore a snapshot from REPO into TARGET")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("target", metavar="TARGET", help="folder or fsspec URL")
    sp.add_argument("--snapshot", default="latest", help="'latest' (default) or an id prefix")
    sp.add_argument("--as-of", metavar="TIME", help="latest snapshot at or before TIME, e.g. '2026-11-20 14:00'")
    sp.add_argument("--include", action="append", default=[], metavar="PATTERN",
                    help="restore only matching paths (gitignore syntax, repeatable)")
    sp.add_argument("--no-xattrs", dest="xattrs", action="store_false",
                    help="do not set extended attributes and ACLs")
    sp.add_argument("--no-sparse", dest="sparse", action="store_false",
                    help="write every byte of large files (default: runs of zeros become holes)")
    sp.add_argument("--overwrite", default="if-changed", choices=["never", "if-changed", "always"],
                    help="what to do with files already at the target (default: if-changed)")
    sp.add_argument("--fallback", action="append", default=[], metavar="REPLICA",
                    help="replica to read from when the primary is unreachable or a blob is bad (repeatable)")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)
    _cluster_args(sp, work_dir=True)

    sp = add("replicate", "copy to each replica what it lacks (packs/objects, then index, then manifests)")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("replicas", metavar="REPLICA", nargs="+")
    sp.add_argument("--dry-run", action="store_true", help="show what each replica lacks, copy nothing")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("replicas", "show which snapshots each replica has and what it lacks")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("replicas", metavar="REPLICA", nargs="+")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("verify", "check the repository's structure and re-hash a share of its data")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("--read-data", default="0%", metavar="PERCENT",
                    help="re-hash this share of the stored data, chosen at random (e.g. 10%%; 100%% = all)")
    sp.add_argument("--ciphertext-only", action="store_true",
                    help="format 2, no password needed (a replication host): check that every file is named by "
                         "the BLAKE3 of its bytes and every pack ends in a well-formed footer")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)
    _cluster_args(sp, work_dir=False)

    sp = add("prune", "forget snapshots by a retention policy and collect unreferenced data")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest snapshots (-1: all)")
    for period, unit in (("hourly", "hours"), ("daily", "days"), ("weekly", "weeks"), ("monthly", "months"),
                         ("yearly", "years")):
        sp.add_argument(f"--keep-{period}", type=int, metavar="N",
                        help=f"keep the newest snapshot of each of the last N {unit} that have one (-1: all)")
    sp.add_argument("--keep-tag", action="append", default=[], metavar="TAG", help="keep snapshots with this tag")
    sp.add_argument("--grace", type=float, default=24.0, metavar="HOURS",
                    help="delete data only when it was marked unreferenced at least this long ago (default 24)")
    sp.add_argument("--replica", action="append", default=[], metavar="URL",
                    help="apply the same policy to this replica too (repeatable)")
    sp.add_argument("--dry-run", action="store_true", help="show what would be forgotten and freed")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("unlock", "remove stale leases left by killed processes (live leases are kept) "
                       "and mark their dead flow runs Crashed")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("repair", "rebuild the index from the stored data, or replace snapshots that reference lost data")
    what = sp.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser, required=True)
    rp = what.add_parser("index", help="rebuild the index from the packs' trailers and the objects",
                         description="rebuild the index from the packs' trailers and the objects; damaged and "
                                     "foreign files are reported, never deleted")
    rp.add_argument("repo", metavar="REPO")
    rp.add_argument("--read-data", action="store_true",
                    help="re-hash every blob; leave out (and report) what does not match its hash")
    rp.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    rp.add_argument("--json", action="store_true")
    _storage_options_arg(rp)
    rp = what.add_parser("snapshots", help="replace snapshots that reference lost data by ones without those files",
                         description="repair the index, then write a replacement (tagged 'repaired') for every "
                                     "snapshot that references data no pack or object holds, without those files")
    rp.add_argument("repo", metavar="REPO")
    rp.add_argument("--forget", action="store_true", help="remove each damaged original once its replacement exists")
    rp.add_argument("--dry-run", action="store_true", help="report what would be dropped, write nothing")
    rp.add_argument("--json", action="store_true")
    _storage_options_arg(rp)

    sp = add("snapshots", "list snapshots")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("ls", "list the entries of a snapshot")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("snapshot", metavar="SNAPSHOT", nargs="?", default="latest")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("diff", "compare two snapshots")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("snap_a", metavar="SNAP_A")
    sp.add_argument("snap_b", metavar="SNAP_B")
    sp.add_argument("--json", action="store_true")
    _storage_options_arg(sp)

    sp = add("serve", "run the scheduled jobs of a TOML configuration file from this process (needs a Prefect server)")
    sp.add_argument("config", metavar="CONFIG", help="TOML file: sources, repositories, replicas, schedules")
    sp.add_argument("--check", action="store_true", help="check CONFIG, list its jobs and exit")
    sp.add_argument("--limit", type=int, default=None, metavar="N", help="run at most N flow runs at once")

    add_stats_parser(sub)
    add_key_parser(sub, _password_arg)
    add_server_parser(sub)
    # Every command that opens a repository takes --password-file.
    for name, sp in sub.choices.items():
        if name not in ("serve", "key", "server") and "--password-file" not in sp._option_string_actions:
            _password_arg(sp)
    for sp in what.choices.values():
        _password_arg(sp)
    return p


def _password_arg(sp) -> None:
    sp.add_argument("--password-file", metavar="FILE", default=None,
                    help="the repository password is the first line of FILE (else $KEEPFLOW_PASSWORD, "
                         "$KEEPFLOW_PASSWORD_FILE, $KEEPFLOW_PASSWORD_COMMAND, or a prompt)")


def _skip_pyarrow_pandas_probe() -> None:
    """Save ~0.3 s per command: keep pyarrow from importing pandas.

    pyarrow imports pandas the first time it converts Python objects, only to
    check whether they are pandas objects. The command line never hands it
    any, so for that one probe we show pyarrow a stand-in module reporting an
    unsupported pandas version: pyarrow then skips its pandas integration
    (quietly, we silence its warning) and the stand-in is removed at once.
    Limited to this CLI process; a later real ``import pandas`` still works.
    """
    if "pandas" in sys.modules:
        return
    import types
    import warnings

    stand_in = types.ModuleType("pandas")
    stand_in.__version__ = "0.0.0"
    sys.modules["pandas"] = stand_in
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pyarrow as pa

            pa.array([0])
    finally:
        del sys.modules["pandas"]


def _storage_options_arg(sp) -> None:
    sp.add_argument("--storage-options", metavar="JSON", type=_json_object, default=None,
                    help='fsspec options for REPO as JSON, e.g. \'{"anon": false}\'')


def _cluster_args(sp, work_dir: bool) -> None:
    if work_dir:
        sp.add_argument("--work-dir", metavar="URL", default=None,
                        help="where the run folder goes (plan, work lists, batch results; removed at the end): "
                             "a path or URL every worker reaches (default: $KEEPFLOW_WORK_DIR or the temporary "
                             "folder)")
    sp.add_argument("--dask", metavar="ADDRESS", default=None,
                    help="run the batches on this Dask scheduler (default: $KEEPFLOW_DASK_ADDRESS); "
                         "needs PREFECT_API_URL")
    sp.add_argument("--workers", type=int, default=None, metavar="N",
                    help="run the batches on a local Dask cluster of N processes (all cores for small files)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like {{\"key\": \"value\"}}, not {text!r}")
    return value


def main(argv=None) -> int:
    _skip_pyarrow_pandas_probe()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if getattr(args, "password_file", None):
            from keepflow.tasks.core import passwords

            passwords.use_password_file(args.password_file)
        return COMMANDS[args.command](args)
    except KeepflowError as exc:
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted; the repository is consistent, run the command again to finish")
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        _fail(f"{exc.strerror or exc}{where}")
        from keepflow.tasks.core.storage import is_no_space

        return EXIT_NO_SPACE if is_no_space(exc) else EXIT_FAILED
    except Exception as exc:  # a bug: still one line, traceback only on request
        if args.debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc}; rerun with --debug for details")
        return EXIT_FAILED


def _fail(message: str) -> None:
    print(f"keepflow: error: {message}", file=sys.stderr)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# -- read-only commands (no Prefect) -----------------------------------------

def cmd_init(args) -> int:
    from keepflow.tasks.core.repository import RepoConfig, Repository

    if args.format == 1:
        if args.encryption != "aes-256-gcm" or args.compression != "auto":
            raise UsageError("--encryption and --compression are format 2 settings; format 1 is plaintext and "
                             "uncompressed")
        config = RepoConfig()
    else:
        config = RepoConfig.new_v2(encryption=args.encryption, compression=args.compression)
    repo = Repository.init(args.repo, args.storage_options, config=config)
    if args.json:
        _print_json({"repository": args.repo, "id": repo.config.id, "version": repo.config.version,
                     "encryption": repo.config.encryption, "compression": repo.config.compression})
    else:
        kind = ("plaintext" if repo.version < 2 else
                "encrypted" if repo.encrypted else "not encrypted") 
        print(f"created keepflow repository {repo.config.id[:8]} at {args.repo} (format {repo.version}, {kind})")
    return 0


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
        _print_json([_snap_dict(s) for s in snaps])
        return status
    from keepflow.tasks.core.format import human_bytes

    rows = [("ID", "TIME", "HOST", "SOURCE", "FILES", "SIZE", "TAGS")]
    for s in snaps:
        rows.append((s.short_id, s.time[:19].replace("T", " "), s.host, s.source, str(s.files),
                     human_bytes(s.bytes), ",".join(s.tags)))
    _print_rows(rows)
    print(f"{len(snaps)} snapshots" + (f", {len(damaged)} unreadable" if damaged else ""))
    return status


def _snap_dict(s) -> dict:
    d = dict(s.__dict__)
    return d


def _print_rows(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_ls(args) -> int:
    from keepflow.tasks.core import manifest, snapshots
    from keepflow.tasks.core.repository import Repository

    repo = Repository.open(args.repo, args.storage_options)
    info = snapshots.resolve(repo, args.snapshot)
    table = manifest.read_manifest(repo, info, columns=["path", "type", "size", "mtime_ns", "mode", "hash", "link_target"])
    if args.json:
        _print_json({"snapshot": info.id, "entries": table.to_pylist()})
        return 0
    import datetime as dt
    import stat

    out = sys.stdout
    for row in table.to_pylist():
        when = dt.datetime.fromtimestamp(row["mtime_ns"] / 1e9).strftime("%Y-%m-%d %H:%M")
        name = row["path"] + ("/" if row["type"] == "dir" else "")
        if row["type"] == "symlink":
            name += f" -> {row['link_target']}"
        out.write(f"{stat.filemode(row['mode'] or 0)} {row['size']:>12} {when}  {name!s}\n")
    return 0


def cmd_diff(args) -> int:
    from keepflow.tasks.core import snapshot_diff
    from keepflow.tasks.core.repository import Repository

    repo = Repository.open(args.repo, args.storage_options)
    result = snapshot_diff.compare(repo, args.snap_a, args.snap_b)
    if args.json:
        _print_json(result)
        return 0
    for kind, mark in (("added", "+"), ("modified", "M"), ("deleted", "-")):
        for row in result[kind]:
            print(f"{mark} {row['path']}  ({row['size']} bytes)")
    c = result["summary"]
    print(f"{c['added']} added, {c['modified']} modified, {c['deleted']} deleted")
    return 0


# -- commands that run flows --------------------------------------------------

def _prepare_prefect(verbose: bool) -> None:
    """Environment for Prefect, set before it is imported."""
    # A backup tool sends nothing anywhere by default: Prefect's SDK and server
    # analytics are off unless the user sets these variables otherwise.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # A server `keepflow server start` left running serves this command (unless the
    # user chose another); otherwise Prefect's temporary one, announced on a terminal.
    from keepflow.flows import cli_server

    if not cli_server.use_running_server() and not os.environ.get("PREFECT_API_URL") \
            and not cli_server.profile_api_url():
        cli_server.hint_once_per_hour()
    if not verbose:
        # Logs still go to the API (run history); only the console is quiet,
        # so failures reach the user as our one-line errors, not tracebacks.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


def _run_flow(flow_fn, kwargs, args, phase: str) -> dict:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from keepflow.flows import _history
    from keepflow.flows._progress import progress_for

    # An ad hoc run from the command line sends no heartbeats: the engine joins
    # the heartbeat thread at the end, which costs up to a second per command,
    # and nothing acts on heartbeats unless a zombie-run automation is set up.
    # Deployments (serve, workers) keep Prefect's heartbeat.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
            progress_for(phase, enabled=sys.stderr.isatty() and not args.json):
        state = flow_fn(**kwargs, return_state=True)
    flow_run_id = state.state_details.flow_run_id if state.state_details else None
    outcome = state.result(raise_on_failure=False)
    expected = outcome.get("task_runs", 0) if isinstance(outcome, dict) else 0
    _history.settle(flow_run_id, expected)
    if isinstance(outcome, dict):
        return outcome  # a summary, even when the run ended Failed (e.g. restore errors)
    return state.result(raise_on_failure=True)  # re-raises the task's own exception


def _cluster(args, uses_work_dir: bool) -> dict:
    """The flow parameters for --dask/--workers/--work-dir; usage errors before Prefect is imported."""
    from keepflow.flows import _dask

    address, workers = _dask.choose(args.dask, args.workers)
    out = dict(dask_address=address, workers=workers)
    if uses_work_dir:
        out["work_dir"] = args.work_dir
    return out


def _on_cluster(flow_fn, cluster: dict):
    """``flow_fn`` with its batches on the Dask cluster asked for (or as it is)."""
    from keepflow.flows import _dask

    address, workers = cluster["dask_address"], cluster["workers"]
    _dask.check(address, workers, work_dir=cluster.get("work_dir"), uses_work_dir="work_dir" in cluster,
                api_url=_dask.api_url())
    runner = _dask.task_runner(address, workers)
    return flow_fn.with_options(task_runner=runner) if runner is not None else flow_fn


def cmd_backup(args) -> int:
    cluster = _cluster(args, uses_work_dir=True)
    _prepare_prefect(args.verbose)
    from keepflow.flows.backup import backup

    summary = _run_flow(_on_cluster(backup, cluster),
                        dict(source=args.source, repo=args.repo, tags=args.tag, excludes=args.exclude,
                             rehash=args.rehash, parent=args.parent, dry_run=args.dry_run,
                             storage_options=args.storage_options,
                             replicate_to=args.replicate_to, wait_for_lease=args.retry_lock, xattrs=args.xattrs,
                             compression=args.compression, **cluster),
                        args, "backup")
    if args.json:
        _print_json(summary)
        return summary["exit_code"]
    from keepflow.tasks.core.format import human_bytes

    if summary["dry_run"]:
        print(f"dry run: would store {human_bytes(summary['bytes_stored'])} "
              f"(read {human_bytes(summary['bytes_read'])}); nothing was written")
    else:
        parent = f" (parent {summary['parent'][:8]})" if summary["parent"] else ""
        print(f"snapshot {summary['snapshot'][:8]} saved{parent}")
    print(f"files: {summary['files_new']} new, {summary['files_changed']} changed, "
          f"{summary['files_unchanged']} unchanged, {summary['files_deleted']} deleted "
          f"({summary['files']} files, {human_bytes(summary['bytes'])})")
    objects = f" and {summary['objects_written']} objects" if summary["objects_written"] else ""
    print(f"read {human_bytes(summary['bytes_read'])}, stored {human_bytes(summary['bytes_stored'])} of new data, "
          f"{human_bytes(summary['bytes_written'])} written in {summary['packs_written']} packs{objects}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} files:", file=sys.stderr)
        for s in summary["skipped"][:50]:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
    if "replication" in summary:
        _print_replication(summary["replication"])
    return summary["exit_code"]


def cmd_restore(args) -> int:
    cluster = _cluster(args, uses_work_dir=True)
    _prepare_prefect(args.verbose)
    from keepflow.flows.restore import restore

    summary = _run_flow(_on_cluster(restore, cluster),
                        dict(repo=args.repo, target=args.target, snapshot=args.snapshot, as_of=args.as_of,
                             includes=args.include, overwrite=args.overwrite, dry_run=args.dry_run,
                             storage_options=args.storage_options, fallbacks=args.fallback, sparse=args.sparse,
                             xattrs=args.xattrs, **cluster),
                        args, "restore")
    if args.json:
        _print_json(summary)
        return summary["exit_code"]
    from keepflow.tasks.core.format import human_bytes

    verb = "would write" if args.dry_run else "wrote"
    print(f"restored snapshot {summary['snapshot'][:8]} into {args.target}: {verb} {summary['files_written']} files "
          f"({human_bytes(summary['bytes_written'])}), {summary['files_identical']} already identical, "
          f"{summary['files_kept']} kept")
    if len(summary["blobs_from"]) > 1 or summary["read_from"] != args.repo:
        print("blobs read from: " + ", ".join(f"{url} ({n})" for url, n in summary["blobs_from"].items()))
    for e in summary["errors"][:50]:
        print(f"  {e['path']}: {e['reason']}", file=sys.stderr)
    if summary["errors"]:
        print(f"keepflow: error: {len(summary['errors'])} files could not be restored", file=sys.stderr)
    return summary["exit_code"]


def cmd_replicate(args) -> int:
    _prepare_prefect(args.verbose)
    from keepflow.flows.replicate import replicate

    summary = _run_flow(replicate, dict(repo=args.repo, replicas=args.replicas, dry_run=args.dry_run,
                                        storage_options=args.storage_options), args, "replicate")
    if args.json:
        _print_json(summary)
    else:
        _print_replication(summary)
    return summary["exit_code"]


def _print_replication(summary: dict) -> None:
    from keepflow.tasks.core.format import human_bytes

    for o in summary["replicas"]:
        if not o["ok"]:
            print(f"{o['replica']}: FAILED: {o['error']}", file=sys.stderr)
        elif summary["dry_run"]:
            print(f"{o['replica']}: lacks {len(o['snapshots_missing'])} snapshots, {o['data_missing']} data objects "
                  f"({human_bytes(o['data_bytes_missing'])}), {o['index_missing']} index files")
        else:
            print(f"{o['replica']}: in step ({o['snapshots']} snapshots); copied {o['data_copied']} data objects "
                  f"({human_bytes(o['bytes_copied'])}), {o['index_copied']} index files, "
                  f"{o['snapshots_copied']} snapshots")
    if summary["failed"]:
        # The remedy follows the cause: only a server that is down is fixed by waiting.
        failed = [o for o in summary["replicas"] if not o["ok"]]
        remedy = ("run replicate again once they are reachable" if all(o.get("transient") for o in failed)
                  else "fix the cause given for each above, then run replicate again")
        print(f"keepflow: error: {len(failed)} replicas failed: {', '.join(summary['failed'])}; {remedy}",
              file=sys.stderr)


def cmd_verify(args) -> int:
    from keepflow.tasks.core.verify import parse_percent

    percent = parse_percent(args.read_data)
    cluster = _cluster(args, uses_work_dir=False)
    _prepare_prefect(args.verbose)
    from keepflow.flows.verify import verify

    summary = _run_flow(_on_cluster(verify, cluster),
                        dict(repo=args.repo, read_data=percent, storage_options=args.storage_options,
                             ciphertext_only=args.ciphertext_only, **cluster),
                        args, "verify")
    if args.json:
        _print_json(summary)
        return summary["exit_code"]
    from keepflow.tasks.core.format import human_bytes

    if summary.get("ciphertext_only"):
        print(f"ciphertext only (no key): {summary['snapshots']} snapshots, {summary['keys']} packs; every file "
              f"checked against its name, {summary['keys_read']} packs read whole "
              f"({human_bytes(summary['bytes_read'])}); tags and references were not checked")
    else:
        print(f"{summary['snapshots']} snapshots, {summary['blobs']} blobs in {summary['keys']} keys; "
              f"re-hashed {summary['keys_read']} keys ({human_bytes(summary['bytes_read'])})")
    for p in summary["problems"][:100]:
        where = ", ".join(p["paths"][:3]) + (" ..." if len(p["paths"]) > 3 else "")
        snaps = ", ".join(s[:8] for s in p["snapshots"][:5])
        print(f"  {p['kind']}: {p['key'] or p['hash']}: {p['detail']}"
              + (f" (snapshots {snaps}; {where})" if p["snapshots"] else ""), file=sys.stderr)
    if summary["problems"]:
        print(f"keepflow: error: {len(summary['problems'])} problems found; restore affected files from a "
              "replica (--fallback) or run a new backup", file=sys.stderr)
    else:
        print("no problems found")
    return summary["exit_code"]


def cmd_prune(args) -> int:
    from keepflow.tasks.core import retention

    policy = retention.Policy(args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly,
                              args.keep_monthly, args.keep_yearly, args.keep_tag)
    if policy.empty():   # refuse before starting a flow run
        raise UsageError("no retention rule given; pass at least one --keep-* option (nothing was forgotten)")
    if args.grace < 0:
        raise UsageError(f"--grace must be 0 or more hours, not {args.grace:g}")
    _prepare_prefect(args.verbose)
    from keepflow.flows.prune import prune

    summary = _run_flow(prune, dict(repo=args.repo, keep_last=args.keep_last, keep_hourly=args.keep_hourly,
                                    keep_daily=args.keep_daily, keep_weekly=args.keep_weekly,
                                    keep_monthly=args.keep_monthly, keep_yearly=args.keep_yearly,
                                    keep_tags=args.keep_tag, grace_hours=args.grace, dry_run=args.dry_run,
                                    storage_options=args.storage_options, replicas=args.replica), args, "prune")
    if args.json:
        _print_json(summary)
        return summary["exit_code"]
    from keepflow.tasks.core.format import human_bytes

    verb = "would forget" if args.dry_run else "forgot"
    print(f"{verb} {len(summary['forgotten'])} snapshots, keeping {len(summary['kept'])}")
    for s in summary["forgotten"][:50]:
        print(f"  - {s['id'][:8]}  {s['time'][:19].replace('T', ' ')}  {s['source']}")
    m, w = summary["marked"], summary["swept"]
    print(f"{'would mark' if args.dry_run else 'marked'} {m['keys']} keys ({human_bytes(m['bytes'])}) unreferenced"
          + (f", repacked {m['repacked_packs']} packs" if m["repacked_packs"] else ""))
    if "postponed" in w:
        print(f"deletion postponed: {w['postponed']}")
    else:
        print(f"{'would delete' if args.dry_run else 'deleted'} {w['keys_deleted']} keys, "
              f"freeing {human_bytes(w['bytes_freed'])}; {w['marks_waiting']} marks wait for the "
              f"{args.grace:g} h grace period")
    for r in summary.get("replicas", []):
        if r["ok"]:
            print(f"replica {r['repository']}: forgot {r['forgotten']} snapshots, freed {human_bytes(r['bytes_freed'])}")
        else:
            print(f"keepflow: error: prune of replica {r['repository']} failed: {r['error']}", file=sys.stderr)
    return summary["exit_code"]


def cmd_unlock(args) -> int:
    from keepflow.tasks.core import lease, runs
    from keepflow.tasks.core.repository import Repository

    removed, kept = lease.unlock(Repository.open(args.repo, args.storage_options))
    crashed, elsewhere = [], []
    # Prefect is imported only when this host has a dead run of REPO to mark
    # (tasks/core/runs.py), so a plain unlock stays a sub-second command.
    if runs.dead_runs(runs.default_folder(), args.repo):
        _prepare_prefect(args.verbose)
        from keepflow.flows._runs import crash_dead_runs

        crashed, elsewhere = crash_dead_runs(args.repo, by="keepflow unlock")
    if args.json:
        _print_json({"removed": [l.__dict__ for l in removed], "live": [l.__dict__ for l in kept],
                     "crashed": [{"flow_run_id": r.flow_run_id, "name": r.flow_run_name, "flow": r.flow,
                                  "pid": r.pid} for r in crashed]})
        return 0
    print(f"removed {len(removed)} stale leases")
    for r in crashed:
        print(f"marked flow run {r.flow_run_name} Crashed ({r.flow}, pid {r.pid} is gone)")
    for l in kept:
        print(f"kept live lease {l.id[:8]}: {l.kind} {l.source or ''} on {l.host} pid {l.pid}, expires {l.expires[:19]}"
              " (wait for it to finish or expire)", file=sys.stderr)
    for url in sorted({r.api_url or "" for r in elsewhere}):
        how = f"with PREFECT_API_URL={url}" if url else "without PREFECT_API_URL (the embedded server)"
        print(f"left dead flow runs recorded in another Prefect API alone; run unlock again {how}", file=sys.stderr)
    return 0


def cmd_repair(args) -> int:
    _prepare_prefect(args.verbose)
    from keepflow.flows.repair import repair

    summary = _run_flow(repair, dict(repo=args.repo, what=args.what, read_data=getattr(args, "read_data", False),
                                     forget=getattr(args, "forget", False), dry_run=args.dry_run,
                                     storage_options=args.storage_options), args, "repair")
    if args.json:
        _print_json(summary)
        return summary["exit_code"]
    if args.what == "index":
        _print_index_repair(summary, args.repo)
        lost = summary["lost"]
        if lost:
            files = sum(p["files"] for p in lost)
            print(f"keepflow: error: {len(lost)} blobs are lost ({files} files in "
                  f"{len({s for p in lost for s in p['snapshots']})} snapshots); run `keepflow repair snapshots "
                  f"{args.repo}` to replace those snapshots by ones without the lost files", file=sys.stderr)
        elif summary["exit_code"]:
            print(f"keepflow: error: {len(summary['unreadable'])} unreadable keys, {len(summary['corrupt'])} corrupt "
                  f"blobs, {len(summary['damaged_manifests'])} damaged manifests (left alone, listed above); "
                  "restore what they hold from a replica", file=sys.stderr)
        return summary["exit_code"]
    _print_index_repair(summary["index"], args.repo, brief=True)
    verb = "would replace" if args.dry_run else "replaced"
    print(f"{summary['snapshots']} snapshots checked, {summary['snapshots_damaged']} reference "
          f"{summary['blobs_lost']} lost blobs")
    for r in summary["replaced"]:
        print(f"{verb} snapshot {r['original'][:8]} by {r['replacement'][:8]} (tagged repaired): "
              f"dropped {r['files_dropped']} files")
    for f in summary["files_dropped"]:
        print(f"  dropped {f['snapshot'][:8]}: {f['path']}")
    for r in summary["already_replaced"]:
        print(f"snapshot {r['original'][:8]} was replaced before by {r['replacement'][:8]}")
    for snap in summary["forgotten"]:
        print(f"{'would forget' if args.dry_run else 'forgot'} snapshot {snap[:8]}")
    if summary["files_dropped"]:
        print(f"keepflow: error: the content of {len(summary['files_dropped'])} files is lost; the replacement "
              "snapshots restore everything else (restore the lost files from a replica if one has them)",
              file=sys.stderr)
    elif summary["already_replaced"] and not args.forget:
        print(f"keepflow: error: {len(summary['already_replaced'])} replaced originals still reference lost data; "
              f"remove them with `keepflow repair snapshots {args.repo} --forget`", file=sys.stderr)
    elif summary["exit_code"]:
        print("keepflow: error: unreadable or corrupt data or damaged manifests were found (listed above, left "
              "alone); restore what they hold from a replica", file=sys.stderr)
    return summary["exit_code"]


def _print_index_repair(s: dict, repo: str, brief: bool = False) -> None:
    verb = "would index" if s["dry_run"] else "indexed"
    print(f"{verb} {s['blobs_indexed']} blobs in {s['packs']} packs and {s['objects']} objects: "
          f"{s['blobs_found']} newly found, {s['rows_dropped']} old index rows dropped (their data is gone)")
    if s["index_written"]:
        print(f"wrote index/{s['index_written']}, then removed {s['index_files_removed']} old index files")
    elif not s["dry_run"]:
        print("the index was already complete: nothing written")
    if s["read_data"]:
        print(f"re-hashed {s['keys_read']} keys ({s['bytes_read']} bytes)")
    for kind in ("unreadable", "corrupt", "foreign", "index_files_unreadable", "damaged_manifests"):
        for p in s[kind]:
            print(f"  {kind.replace('_', ' ')}: {p['key']}{' ' + p['hash'][:16] if p.get('hash') else ''}: "
                  f"{p['detail']}", file=sys.stderr)
    if not brief:
        for p in s["lost"]:
            where = ", ".join(p["paths"][:3]) + (" ..." if len(p["paths"]) > 3 else "")
            print(f"  lost {p['hash'][:16]}: {p['detail']} (snapshots {', '.join(x[:8] for x in p['snapshots'])}"
                  f"; {where})", file=sys.stderr)


def cmd_replicas(args) -> int:
    from keepflow.tasks.core import replicate as core_replicate
    from keepflow.tasks.core.repository import Repository

    primary = Repository.open(args.repo, args.storage_options, unlock=False)   # listings only: no password
    statuses = [core_replicate.status(primary, url) for url in args.replicas]
    if args.json:
        _print_json([s.to_dict() for s in statuses])
        return 0
    from keepflow.tasks.core.format import human_bytes

    for s in statuses:
        if not s.exists:
            print(f"{s.replica}: no replica yet (lacks all {len(s.snapshots_missing)} snapshots, "
                  f"{human_bytes(s.data_bytes_missing)})")
            continue
        state = "in step" if not (s.snapshots_missing or s.data_missing or s.index_missing) else "behind"
        print(f"{s.replica}: {state}: has {len(s.snapshots_present)} snapshots, lacks {len(s.snapshots_missing)}"
              f" ({s.data_missing} data objects, {human_bytes(s.data_bytes_missing)})"
              + (f"; {len(s.damaged)} damaged objects" if s.damaged else ""))
        for snap in s.snapshots_missing[:20]:
            print(f"  missing {snap}")
    return 0


def cmd_serve(args) -> int:
    from keepflow.flows.serve_config import load

    jobs = load(args.config)  # a bad file fails here, in one line, before Prefect is imported
    for job in jobs:
        when = [job.schedule.describe()] if job.schedule else []
        when += [f"after each backup of {job.after_backup_of}"] if job.after_backup_of else []
        print(f"{job.flow}/{job.name}: {' and '.join(when)}")
    if args.check:
        return 0
    _prepare_prefect(args.verbose)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UsageError("keepflow serve needs a running Prefect server for its schedules: start one with "
                         "`prefect server start --host 127.0.0.1` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from keepflow.flows.serve import serve_config

    print(f"serving {len(jobs)} deployments from {args.config} (Prefect API {PREFECT_API_URL.value()}); "
          "Ctrl-C stops", flush=True)
    serve_config(args.config, limit=args.limit)
    return 0


COMMANDS = {
    "init": cmd_init, "backup": cmd_backup, "restore": cmd_restore,
    "snapshots": cmd_snapshots, "ls": cmd_ls, "diff": cmd_diff, "key": cmd_key, "server": cmd_server,
    "replicate": cmd_replicate, "replicas": cmd_replicas, "verify": cmd_verify,
    "prune": cmd_prune, "unlock": cmd_unlock, "repair": cmd_repair,
    "stats": cmd_stats, "serve": cmd_serve,
}

if __name__ == "__main__":
    raise SystemExit(main())

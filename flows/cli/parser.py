"""The ``keepflow`` argparse tree and the option groups its commands share.

Building the parser imports nothing heavy: ``main`` builds it for every
command, the 0.3 s read-only ones included. Usage errors print one line and
exit 2 (``_Parser.error``). Every command that opens a repository (it has a
REPO argument) takes ``--storage-options`` and ``--password-file``: the end of
``build_parser`` adds them where a command's definition did not.
"""

from __future__ import annotations

import argparse
import json

from keepflow.tasks.core.errors import EXIT_USAGE

COMPRESSION = ["auto", "off", "fastest", "max"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        self.exit(EXIT_USAGE, f"keepflow: error: {message}; see `{self.prog} --help`\n")


class _Version(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked (importlib.metadata ~50 ms)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print keepflow's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import sys

        import keepflow

        print(f"keepflow {keepflow.__version__}", file=sys.stdout)
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="keepflow", description="Backup and restore as Prefect flows.")
    p.add_argument("--version", action=_Version)
    p.add_argument("--verbose", "-v", action="store_true", help="show Prefect's log lines on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text)

    _add_init_backup_restore(add)
    _add_replication_and_upkeep(add)
    _add_repair(add)
    _add_readonly(add)
    _add_key(add)
    _add_server(add)
    # Every command that opens a repository takes its storage options and its password.
    for sp in repository_parsers(p):
        if "--storage-options" not in sp._option_string_actions:
            storage_options_arg(sp)
        if "--password-file" not in sp._option_string_actions:
            password_arg(sp)
    return p


def repository_parsers(parser: argparse.ArgumentParser):
    """The parsers under ``parser`` of the commands that open a repository: those with a REPO argument."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                yield from repository_parsers(sp)
        elif action.dest == "repo" and not action.option_strings:
            yield parser


# -- shared option groups ----------------------------------------------------------

def password_arg(sp) -> None:
    sp.add_argument("--password-file", metavar="FILE", default=None,
                    help="the repository password is the first line of FILE (else $KEEPFLOW_PASSWORD, "
                         "$KEEPFLOW_PASSWORD_FILE, $KEEPFLOW_PASSWORD_COMMAND, or a prompt)")


def storage_options_arg(sp, help_text: str = 'fsspec options for REPO as JSON, e.g. \'{"anon": false}\'') -> None:
    sp.add_argument("--storage-options", metavar="JSON", type=json_object, default=None, help=help_text)


def json_arg(sp, help_text: str | None = None) -> None:
    sp.add_argument("--json", action="store_true", help=help_text)


JSON_HELP = "print one JSON object and nothing else"


def cluster_args(sp, work_dir: bool) -> None:
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


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like {{\"key\": \"value\"}}, not {text!r}")
    return value


# -- the commands ---------------------------------------------------------------------

def _add_init_backup_restore(add) -> None:
    sp = add("init", "create an empty repository (format 2: encrypted and compressed, unless told otherwise)")
    sp.add_argument("repo", metavar="REPO", help="path or fsspec URL")
    sp.add_argument("--format", type=int, choices=[1, 2], default=2,
                    help="repository format: 2 (default; encrypted, compressed, content-defined chunks) or 1 "
                         "(plaintext, whole files, as keepflow before 2026-12)")
    sp.add_argument("--encryption", choices=["aes-256-gcm", "none"], default="aes-256-gcm",
                    help="format 2 only: 'none' keeps manifests and index plain Parquet that DuckDB reads with no "
                         "key, and needs no password (default: aes-256-gcm)")
    sp.add_argument("--compression", choices=COMPRESSION, default="auto",
                    help="format 2 only: the default zstd mode of backups (auto: level 3, raw when it does not "
                         "pay; fastest: 1; max: 9; off)")
    json_arg(sp)
    storage_options_arg(sp)

    sp = add("backup", "back up SOURCE into REPO (creates the repository if needed)")
    sp.add_argument("source", metavar="SOURCE", help="folder or fsspec URL to back up")
    sp.add_argument("repo", metavar="REPO", help="repository path or fsspec URL")
    sp.add_argument("--tag", action="append", default=[], help="tag the snapshot (repeatable)")
    sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="gitignore-style pattern to leave out (repeatable)")
    sp.add_argument("--rehash", action="store_true", help="full backup: read every file, trust no metadata")
    sp.add_argument("--compression", choices=COMPRESSION, default=None,
                    help="format 2: zstd mode for this backup (default: the repository's, set at init)")
    sp.add_argument("--no-xattrs", dest="xattrs", action="store_false",
                    help="do not store extended attributes and ACLs (saves one listxattr per entry)")
    sp.add_argument("--parent", metavar="ID", help="snapshot to diff against (default: latest of this source and host)")
    sp.add_argument("--dry-run", action="store_true", help="report what would be stored, store nothing")
    sp.add_argument("--retry-lock", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to this long for a conflicting run's lease instead of failing")
    sp.add_argument("--replicate-to", action="append", default=[], metavar="URL",
                    help="after the backup, bring this replica up to date (repeatable)")
    json_arg(sp, JSON_HELP)
    storage_options_arg(sp)
    cluster_args(sp, work_dir=True)

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
    json_arg(sp)
    storage_options_arg(sp)
    cluster_args(sp, work_dir=True)


def _add_replication_and_upkeep(add) -> None:
    sp = add("replicate", "copy to each replica what it lacks (packs/objects, then index, then manifests)")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("replicas", metavar="REPLICA", nargs="+")
    sp.add_argument("--dry-run", action="store_true", help="show what each replica lacks, copy nothing")
    json_arg(sp)
    storage_options_arg(sp)

    sp = add("replicas", "show which snapshots each replica has and what it lacks")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("replicas", metavar="REPLICA", nargs="+")
    json_arg(sp)
    storage_options_arg(sp)

    sp = add("verify", "check the repository's structure and re-hash a share of its data")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("--read-data", default="0%", metavar="PERCENT",
                    help="re-hash this share of the stored data, chosen at random (e.g. 10%%; 100%% = all)")
    sp.add_argument("--ciphertext-only", action="store_true",
                    help="format 2, no password needed (a replication host): check that every file is named by "
                         "the BLAKE3 of its bytes and every pack ends in a well-formed footer")
    json_arg(sp)
    storage_options_arg(sp)
    cluster_args(sp, work_dir=False)

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
    json_arg(sp)
    storage_options_arg(sp)

    sp = add("unlock", "remove stale leases left by killed processes (live leases are kept) "
                       "and mark their dead flow runs Crashed")
    sp.add_argument("repo", metavar="REPO")
    json_arg(sp)
    storage_options_arg(sp)


def _add_repair(add) -> None:
    sp = add("repair", "rebuild the index from the stored data, or replace snapshots that reference lost data")
    what = sp.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser, required=True)
    rp = what.add_parser("index", help="rebuild the index from the packs' trailers and the objects",
                         description="rebuild the index from the packs' trailers and the objects; damaged and "
                                     "foreign files are reported, never deleted")
    rp.add_argument("repo", metavar="REPO")
    rp.add_argument("--read-data", action="store_true",
                    help="re-hash every blob; leave out (and report) what does not match its hash")
    rp.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    json_arg(rp)
    storage_options_arg(rp)
    rp = what.add_parser("snapshots", help="replace snapshots that reference lost data by ones without those files",
                         description="repair the index, then write a replacement (tagged 'repaired') for every "
                                     "snapshot that references data no pack or object holds, without those files")
    rp.add_argument("repo", metavar="REPO")
    rp.add_argument("--forget", action="store_true", help="remove each damaged original once its replacement exists")
    rp.add_argument("--dry-run", action="store_true", help="report what would be dropped, write nothing")
    json_arg(rp)
    storage_options_arg(rp)


def _add_readonly(add) -> None:
    sp = add("snapshots", "list snapshots")
    sp.add_argument("repo", metavar="REPO")
    json_arg(sp)
    storage_options_arg(sp)

    sp = add("ls", "list the entries of a snapshot")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("snapshot", metavar="SNAPSHOT", nargs="?", default="latest")
    json_arg(sp)
    storage_options_arg(sp)

    sp = add("diff", "compare two snapshots")
    sp.add_argument("repo", metavar="REPO")
    sp.add_argument("snap_a", metavar="SNAP_A")
    sp.add_argument("snap_b", metavar="SNAP_B")
    json_arg(sp)
    storage_options_arg(sp)

    sp = add("serve", "run the scheduled jobs of a TOML configuration file from this process (needs a Prefect server)")
    sp.add_argument("config", metavar="CONFIG", help="TOML file: sources, repositories, replicas, schedules")
    sp.add_argument("--check", action="store_true", help="check CONFIG, list its jobs and exit")
    sp.add_argument("--limit", type=int, default=None, metavar="N", help="run at most N flow runs at once")

    sp = add("stats", "repository statistics: snapshots, sizes, deduplication, recent growth")
    sp.add_argument("repo", metavar="REPO", help="repository path or fsspec URL")
    sp.add_argument("--last", type=int, default=10, metavar="N",
                    help="show growth over the last N snapshots (default 10)")
    json_arg(sp, JSON_HELP)
    storage_options_arg(sp)


def _add_key(add) -> None:
    sp = add("key", "list, add, remove or change the passwords (key files) of an encrypted repository")
    what = sp.add_subparsers(dest="key_command", metavar="ACTION", required=True, parser_class=_Parser)
    for name, text in (("list", "list the key files"),
                       ("add", "add a password (a new key file); the current password is still needed"),
                       ("remove", "remove a key file (never the last one)"),
                       ("passwd", "change the current password: write a new key file, then remove the old")):
        rp = what.add_parser(name, help=text, description=text)
        rp.add_argument("repo", metavar="REPO")
        if name == "remove":
            rp.add_argument("key_id", metavar="KEY_ID", help="the key file's id (a prefix from `keepflow key list`)")
        if name in ("add", "passwd"):
            rp.add_argument("--new-password-file", metavar="FILE", default=None,
                            help="the new password: the first line of FILE (default: $KEEPFLOW_NEW_PASSWORD, "
                                 "else asked twice on the terminal)")
        json_arg(rp, JSON_HELP)
        storage_options_arg(rp, "fsspec options for REPO as JSON")
        password_arg(rp)


def _add_server(add) -> None:
    from keepflow.flows.cli.server import DEFAULT_PORT

    sp = add("server", "start, stop or show a persistent local Prefect server that later commands use")
    what = sp.add_subparsers(dest="server_command", metavar="ACTION", required=True, parser_class=_Parser)
    rp = what.add_parser("start", help="start Prefect's server in the background on 127.0.0.1")
    rp.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT}, or a free one)")
    json_arg(rp)
    rp = what.add_parser("stop", help="stop the server `keepflow server start` started")
    json_arg(rp)
    rp = what.add_parser("status", help="whether the server runs, and its API and UI addresses")
    json_arg(rp)

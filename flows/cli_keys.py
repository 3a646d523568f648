"""``keepflow key list|add|remove|passwd REPO``: the passwords of an encrypted repository.

Every password has its own key file under ``keys/`` wrapping the one master
key (ARCHITECTURE.md, "Keys and passwords"). Read-only for Prefect: these
commands call ``keepflow.tasks.core.keyring`` directly, no flow run. The current
password comes from the usual sources (``--password-file``,
``KEEPFLOW_PASSWORD``...); the *new* one for ``add`` and ``passwd`` from
``--new-password-file FILE`` or ``KEEPFLOW_NEW_PASSWORD``, else a terminal
prompt (asked twice). No key file is ever rewritten in place: ``passwd``
writes the new file, then removes the old one.
"""

from __future__ import annotations

import json
import os
import sys


def add_key_parser(sub, password_arg) -> None:
    help_text = "list, add, remove or change the passwords (key files) of an encrypted repository"
    sp = sub.add_parser("key", help=help_text, description=help_text)
    what = sp.add_subparsers(dest="key_command", metavar="ACTION", required=True, parser_class=type(sp))
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
        rp.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
        rp.add_argument("--storage-options", metavar="JSON", default=None, type=_json_object,
                        help="fsspec options for REPO as JSON")
        password_arg(rp)


def _json_object(text: str) -> dict:
    from keepflow.flows.cli import _json_object as parse

    return parse(text)


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
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0
    if action == "list":
        for k in out["keys"]:
            params = ", ".join(f"{p}={k[p]}" for p in ("t", "m", "p", "n", "r") if p in k)
            mark = "*" if k["current"] else " "
            print(f"{mark} {k['id']}  {k['created'] or '?':25}  {k['kdf'] or '?'} {params}"
                  + (f"  DAMAGED: {k['problem']}" if k["problem"] else ""))
        print(f"{len(out['keys'])} key file(s); * opens with the password given")
    elif action == "add":
        print(f"added key {out['added']}")
    elif action == "remove":
        print(f"removed key {out['removed']}")
    else:
        print(f"password changed: key {out['removed']} replaced by {out['added']}")
    return 0

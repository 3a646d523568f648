"""Every command that opens a repository takes ``--storage-options`` and ``--password-file``.

Two ways: the parser tree (each command with a REPO argument has both options,
and the list of such commands is the one we expect, so a new command is
seen), and a scenario: an encrypted repository on a real S3 server
(SeaweedFS) that the read-only commands reach with nothing in the
environment, no credentials, no password, no storage config file, only the
two options on the command line.
"""

from __future__ import annotations

import json
import os

import pytest

from keepflow.flows.cli.parser import build_parser, repository_parsers
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests.conftest import TEST_PASSWORD, run_cli
from tests.test_providers import backup, change_tree, tree_v1

REPOSITORY_COMMANDS = {
    "init", "backup", "restore", "replicate", "replicas", "verify", "prune", "unlock", "repair index",
    "repair snapshots", "snapshots", "ls", "diff", "stats", "key list", "key add", "key remove", "key passwd",
}


def test_every_command_with_a_repository_takes_storage_options_and_password_file():
    found = set()
    for sp in repository_parsers(build_parser()):
        name = sp.prog.removeprefix("keepflow ")
        found.add(name)
        assert "--storage-options" in sp._option_string_actions, name
        assert "--password-file" in sp._option_string_actions, name
    assert found == REPOSITORY_COMMANDS


def test_password_file_before_the_repair_action_is_refused_not_ignored(tmp_path):
    # It used to be accepted there and then dropped (the action's default won).
    proc = run_cli(["repair", "--password-file", tmp_path / "pw", "index", tmp_path / "repo"])
    assert proc.returncode == 2 and proc.stderr.startswith("keepflow: error: ")


def _bare_env(tmp_path) -> dict:
    """An environment with no way to the S3 server or the password but the command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KEEPFLOW_PASSWORD"))}
    env.update(HOME=str(tmp_path / "home"), KEEPFLOW_STORAGE_CONFIG=str(tmp_path / "no-storage.toml"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


def test_read_only_commands_reach_s3_with_only_the_command_line_options(s3_server, tmp_path):
    so, url = s3_server.storage_options, s3_server.unique_url()
    Repository.init(url, so, config=RepoConfig.new_v2())        # encrypted: needs the password
    src = tree_v1(tmp_path / "src")
    first = backup(src, url, so)[0].info.id
    change_tree(src)
    second = backup(src, url, so)[0].info.id
    password = tmp_path / "password"
    password.write_text(TEST_PASSWORD + "\n")
    env = _bare_env(tmp_path)
    options = ["--storage-options", json.dumps(so), "--password-file", password, "--json"]

    def run(*args):
        proc = run_cli([*args, *options], env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        return json.loads(proc.stdout)

    assert [s["id"] for s in run("snapshots", url)] == [first, second]
    assert run("ls", url, first[:8])["snapshot"] == first
    assert run("diff", url, first, second)["summary"]["modified"] >= 1
    stats = run("stats", url)
    assert stats["snapshots"] == 2 and stats["format"] == 2
    [status] = run("replicas", url, tmp_path / "replica")
    assert status["exists"] is False
    assert len(run("key", "list", url)["keys"]) == 1
    assert run("unlock", url)["removed"] == []

    # Without them the same command fails in one line: the options were what reached the server.
    for args in (["stats", url, "--password-file", password], ["stats", url, "--storage-options", json.dumps(so)]):
        proc = run_cli(args, env=env)
        assert proc.returncode != 0 and proc.stderr.startswith("keepflow: error: "), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("command", ["snapshots", "stats"])
def test_bad_storage_options_are_a_usage_error(command, tmp_path):
    proc = run_cli([command, tmp_path, "--storage-options", "[1]"])
    assert proc.returncode == 2 and "--storage-options: must be a JSON object" in proc.stderr

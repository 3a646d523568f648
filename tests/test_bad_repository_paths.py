"""Exit codes for bad repository locations, command by command (issue 11).

Every location that is not a usable repository exits 10 ("no usable
repository") with one line naming it; a regular file used to give exit 1.
"""

from __future__ import annotations

import json

import pytest

from keepflow.tasks.core.errors import EXIT_NO_REPO

from tests.conftest import make_tree
from tests.test_cli_errors import assert_one_error


def _missing(tmp_path):
    return tmp_path / "nothing-here"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _regular_file(tmp_path):
    (tmp_path / "a-file").write_text("not a repository")
    return tmp_path / "a-file"


def _inside_a_file(tmp_path):
    return _regular_file(tmp_path) / "repo"


def _foreign_folder(tmp_path):
    return make_tree(tmp_path / "photos", {"holiday.jpg": "jpeg", "notes.txt": "hi"})


def _garbage_config(tmp_path):
    return make_tree(tmp_path / "broken", {"keepflow.json": "{not json"})


def _newer_format(tmp_path):
    return make_tree(tmp_path / "future", {"keepflow.json": json.dumps({"version": 99, "id": "x"})})


LOCATIONS = [_missing, _empty_folder, _regular_file, _inside_a_file, _foreign_folder, _garbage_config,
             _newer_format]
# Every location for one read-only command; the others share its code path
# (Repository.open), so they get the case that used to exit 1.
CASES = ([(["snapshots"], loc) for loc in LOCATIONS]
         + [(cmd, loc) for cmd in (["ls"], ["stats"], ["replicas", "/tmp/kf-no-replica"])
            for loc in (_regular_file, _inside_a_file)])
# Commands that run a flow cost a Prefect start each: the regular file for
# all, every kind of foreign content for verify.
FLOW_CASES = ([(cmd, _regular_file) for cmd in (["restore", "{tmp}/out"], ["prune", "--keep-last", "1"],
                                                ["unlock"], ["backup"])]
              + [(["verify"], loc) for loc in (_regular_file, _foreign_folder, _garbage_config)])


def _ids(case):
    return case[0][0] + "-" + case[1].__name__.strip("_")


@pytest.mark.damages_repository   # the garbage and newer-format configs are not repositories on purpose
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_read_only_commands_exit_10(tmp_path, case, cli):
    command, location = case
    repo = location(tmp_path)
    proc = cli(command[0], str(repo), *command[1:])
    assert_one_error(proc, EXIT_NO_REPO, str(repo))


@pytest.mark.damages_repository
@pytest.mark.parametrize("case", FLOW_CASES, ids=_ids)
def test_commands_that_change_data_exit_10(tmp_path, case, cli):
    command, location = case
    repo = location(tmp_path)
    if command[0] == "backup":
        src = make_tree(tmp_path / "src", {"a": "x"})
        proc = cli("backup", str(src), str(repo))
    else:
        proc = cli(command[0], str(repo), *[a.replace("{tmp}", str(tmp_path)) for a in command[1:]])
    assert_one_error(proc, EXIT_NO_REPO, str(repo))

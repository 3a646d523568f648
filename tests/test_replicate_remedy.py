"""The replicate summary gives the remedy that fits the cause (issue 11).

Replicating into a location that holds another repository named the cause on
the first line and then said "run replicate again once they are reachable":
waiting is the remedy only for a server that is down.
"""

from __future__ import annotations

from tests import core_helpers
from tests.conftest import make_tree
from tests.servers import free_port


def _primary(tmp_path):
    src = make_tree(tmp_path / "src", {"a": "alpha", "b/c": "gamma"})
    repo = tmp_path / "repo"
    core_helpers.backup(src, repo)
    return repo


def test_a_replica_that_is_another_repository_gets_fix_the_cause(tmp_path, cli):
    repo = _primary(tmp_path)
    other = _primary(tmp_path / "elsewhere")      # a different repository (another id)
    proc = cli("replicate", str(repo), str(other))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert str(other) in lines[0]
    assert "reachable" not in proc.stderr
    assert lines[-1].endswith("fix the cause given for each above, then run replicate again")


def test_an_unreachable_replica_gets_run_again_once_reachable(tmp_path, cli):
    repo = _primary(tmp_path)
    down = f"sftp://root@127.0.0.1:{free_port()}/srv/replica"   # nothing listens there
    proc = cli("replicate", str(repo), down)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("run replicate again once they are reachable")

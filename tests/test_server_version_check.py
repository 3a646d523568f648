"""`keepflow server start` records Prefect's version; commands skip the API version check only while it matches."""

from __future__ import annotations

import json
import os

import prefect
import pytest

from keepflow.flows.cli import server

VAR = "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"


def test_prefect_version_read_without_import():
    assert server.prefect_version() == prefect.__version__


@pytest.mark.parametrize("recorded, skipped", [(prefect.__version__, True), ("3.0.0", False), (None, False)])
def test_check_skipped_only_for_the_same_version(tmp_path, monkeypatch, recorded, skipped):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.setattr(server, "_healthy", lambda url, timeout=0.5: True)
    server.state_file().parent.mkdir(parents=True)
    state = {"api_url": "http://127.0.0.1:1/api", "ui_url": "http://127.0.0.1:1"}
    if recorded:
        state["prefect_version"] = recorded
    server.state_file().write_text(json.dumps(state))
    assert server.use_running_server()
    assert (VAR in os.environ) is skipped
    if skipped:
        assert os.environ[VAR] == "false"


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv(VAR, "true")
    server.skip_version_check()
    assert os.environ[VAR] == "true"

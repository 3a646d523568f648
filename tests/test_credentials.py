"""Storage options from Prefect blocks and from the per-URL config file."""

from __future__ import annotations

import json

import pytest

from keepflow.tasks.core import storage_config
from keepflow.tasks.core.errors import UsageError


def test_secret_block_supplies_storage_options(prefect_api_url, tmp_path):
    from prefect.blocks.system import Secret

    from keepflow.flows._credentials import resolve

    Secret(value=json.dumps({"auto_mkdir": True})).save("kf-test-options", overwrite=True, _sync=True)
    assert resolve("secret/kf-test-options") == {"auto_mkdir": True}
    assert resolve({"a": 1}) == {"a": 1} and resolve(None) is None
    with pytest.raises(UsageError, match="block reference"):
        resolve("not-a-reference")
    with pytest.raises(UsageError, match="unknown block kind"):
        resolve("vault/x")


def test_backup_flow_reads_options_from_a_block(prefect_api_url, tmp_path):
    """The flow parameter names the block; the secret never appears in the parameters."""
    from prefect.blocks.system import Secret

    from keepflow.flows.backup import backup

    from tests.conftest import make_tree

    Secret(value=json.dumps({"auto_mkdir": True})).save("kf-local-opts", overwrite=True, _sync=True)
    src = make_tree(tmp_path / "src", {"a": "1"})
    summary = backup(str(src), f"file://{tmp_path}/repo", storage_options="secret/kf-local-opts")
    assert summary["files_new"] == 1


def test_config_file_longest_prefix_and_explicit_override(tmp_path, monkeypatch):
    cfg = tmp_path / "storage.toml"
    cfg.write_text('["s3://backups"]\nendpoint_url = "http://127.0.0.1:9"\nkey = "general"\n'
                   '["s3://backups/team-a"]\nkey = "team-a"\n')
    monkeypatch.setenv("KEEPFLOW_STORAGE_CONFIG", str(cfg))
    assert storage_config.options_for("s3://backups/team-a/repo")["key"] == "team-a"
    general = storage_config.options_for("s3://backups/other")
    assert general == {"key": "general", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    assert storage_config.options_for("az://elsewhere") == {}
    merged = storage_config.merged("s3://backups/x", {"key": "cli", "client_kwargs": {"region_name": "r"}})
    assert merged["key"] == "cli" and merged["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9",
                                                                   "region_name": "r"}


def test_bad_config_file_is_a_clear_error(tmp_path, monkeypatch):
    cfg = tmp_path / "storage.toml"
    cfg.write_text("this is = = not toml")
    monkeypatch.setenv("KEEPFLOW_STORAGE_CONFIG", str(cfg))
    with pytest.raises(UsageError, match="not valid TOML"):
        storage_config.options_for("s3://x/y")


def test_aws_credentials_block_reaches_a_real_s3_server(prefect_api_url, s3_server, tmp_path):
    """prefect-aws AwsCredentials -> s3fs options, used for a real backup into SeaweedFS."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from keepflow.flows._credentials import resolve
    from keepflow.flows.backup import backup
    from keepflow.tasks.core.repository import Repository
    from keepflow.tasks.core.snapshots import list_snapshots

    from tests.conftest import make_tree

    opts = s3_server.storage_options
    AwsCredentials(aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"], region_name="us-east-1",
                   aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint)
                   ).save("kf-seaweed", overwrite=True, _sync=True)
    resolved = resolve("aws-credentials/kf-seaweed")
    assert resolved["key"] == opts["key"] and resolved["client_kwargs"]["endpoint_url"] == s3_server.endpoint
    url = s3_server.unique_url("blockrepo")
    src = make_tree(tmp_path / "src", {"a.txt": "via a block"})
    summary = backup(str(src), url, storage_options="aws-credentials/kf-seaweed")
    assert summary["files_new"] == 1
    assert len(list_snapshots(Repository.open(url, opts))) == 1

"""Repository format: create, open, refuse foreign or newer data; write-once."""

from __future__ import annotations

import json

import fsspec
import pytest

from keepflow.tasks.core import storage
from keepflow.tasks.core.errors import (
    NotARepositoryError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    RepositoryVersionError,
    UsageError,
)
from keepflow.tasks.core.repository import CONFIG_NAME, DEFAULT_FORMAT, FORMAT_VERSION, RepoConfig, Repository


def test_init_then_open_reads_same_config(repo_url):
    """The default (format 2, encrypted): plain id/version/encryption, the rest sealed and opened."""
    created = Repository.init(repo_url)
    opened = Repository.open(repo_url)
    assert opened.config.id == created.config.id
    assert opened.config.version == FORMAT_VERSION == DEFAULT_FORMAT
    assert opened.config.encryption == "aes-256-gcm" and opened.config.sealed is None   # unlocked, opened
    assert opened.config.ids == "blake3-256-keyed" and opened.config.hash == ""
    assert opened.config.sealed_fields() == created.config.sealed_fields()
    assert opened.config.pack_size >= 16 * 1024 * 1024
    raw = json.loads(opened.fs.cat_file(opened.path(CONFIG_NAME)))
    assert raw["version"] == 2 and raw["id"] == created.config.id
    assert isinstance(raw["config"], str) and "pack_size" not in raw             # encrypted, not in the clear


def test_init_format_1_then_open_reads_same_config(repo_url):
    created = Repository.init(repo_url, config=RepoConfig())
    opened = Repository.open(repo_url)
    assert opened.config.id == created.config.id
    assert opened.config.version == 1
    assert opened.config.hash == "blake3-256"
    assert opened.keys is None and not opened.encrypted
    raw = json.loads(opened.fs.cat_file(opened.path(CONFIG_NAME)))
    assert raw["pack_size"] >= 16 * 1024 * 1024


def test_init_twice_is_refused(repo_url):
    Repository.init(repo_url)
    with pytest.raises(RepositoryExistsError):
        Repository.init(repo_url)


def test_open_missing_without_create(repo_url):
    with pytest.raises(RepositoryNotFoundError):
        Repository.open(repo_url)


def test_open_with_create_makes_repository(repo_url):
    repo = Repository.open(repo_url, create=True)
    assert Repository.open(repo_url).config.id == repo.config.id


def test_foreign_content_is_refused_and_untouched(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(NotARepositoryError):
        Repository.open(str(foreign), create=True)
    with pytest.raises(NotARepositoryError):
        Repository.init(str(foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


@pytest.mark.damages_repository
def test_newer_format_is_refused(repo_url):
    repo = Repository.init(repo_url)
    config = json.loads(repo.fs.cat_file(repo.path(CONFIG_NAME)))
    config["version"] = FORMAT_VERSION + 1
    repo.fs.pipe_file(repo.path(CONFIG_NAME), json.dumps(config).encode())
    with pytest.raises(RepositoryVersionError, match="upgrade keepflow"):
        Repository.open(repo_url)


@pytest.mark.damages_repository
def test_garbage_config_is_refused(repo_url):
    repo = Repository.init(repo_url)
    repo.fs.pipe_file(repo.path(CONFIG_NAME), b"not json")
    with pytest.raises(NotARepositoryError):
        Repository.open(repo_url)


def test_write_once_never_overwrites(repo_url):
    repo = Repository.init(repo_url)
    path = repo.path("packs", "ab", "abcdef")
    assert storage.write_once(repo.fs, path, b"first") is True
    assert storage.write_once(repo.fs, path, b"second") is False
    assert repo.fs.cat_file(path) == b"first"


def test_local_write_once_leaves_no_temporary_files(tmp_path):
    fs = fsspec.filesystem("file")
    target = tmp_path / "x" / "blob"
    storage.write_once(fs, str(target), b"data")
    storage.write_once(fs, str(target), b"data")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["blob"]


def test_unknown_scheme_is_a_usage_error():
    with pytest.raises(UsageError, match="nosuchscheme"):
        Repository.open("nosuchscheme://bucket/repo")


def test_write_stream_once_never_overwrites(repo_url):
    import io

    repo = Repository.init(repo_url)
    path = repo.path("objects", "ab", "abcdef")
    assert storage.write_stream_once(repo.fs, path, io.BytesIO(b"x" * 3000), chunk=1000) is True
    assert storage.write_stream_once(repo.fs, path, io.BytesIO(b"other"), chunk=1000) is False
    assert repo.fs.cat_file(path) == b"x" * 3000
    assert [p for p in repo.fs.ls(repo.path("objects", "ab"), detail=False) if ".tmp-" in p] == []

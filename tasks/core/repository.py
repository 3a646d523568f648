"""The repository: its layout, its config file, and how it is created and opened.

Layout (format version 1, see ARCHITECTURE.md)::

    keepflow.json                     format version, repo id, hash, pack settings
    snapshots/<UTC-ts>-<id>.parquet   one manifest per snapshot, written last
    index/<name>.parquet              hash -> (key, offset, length), one per run
    packs/<ab>/<pack-hash>            small blobs concatenated
    objects/<ab>/<blob-hash>          one large blob stored whole
    locks/, trash/                    reserved for leases and two-phase GC

Every key stored in the index is relative to the repository root, so a
replica (the same tree on another provider) can use the same index files.

Opening decides between four situations: a keepflow.json we understand (open
it), one written by a newer format (refuse, never misread), no keepflow.json
but other content (refuse: we never write into somebody else's data), or an
empty/missing location (create it when the caller allows).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage
from .errors import (
    NotARepositoryError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    RepositoryVersionError,
)

FORMAT_VERSION = 1
CONFIG_NAME = "keepflow.json"
DEFAULT_PACK_SIZE = 16 * 1024 * 1024
DEFAULT_SMALL_FILE_THRESHOLD = 1024 * 1024
# Folders a repository may contain; anything else at the top level means the
# location belongs to somebody else.
KNOWN_ENTRIES = {CONFIG_NAME, "snapshots", "index", "packs", "objects", "locks", "trash", "tmp"}


@dataclass
class RepoConfig:
    version: int = FORMAT_VERSION
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    hash: str = "blake3-256"
    pack_size: int = DEFAULT_PACK_SIZE
    small_file_threshold: int = DEFAULT_SMALL_FILE_THRESHOLD
    created_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )
    # Room for the planned features: None means "not used" in version 1.
    compression: str | None = None
    encryption: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> "RepoConfig":
        raw = json.loads(data)
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


class Repository:
    """An opened repository: URL, filesystem, root and config.

    Cheap to create; holds no open connections beyond the fsspec instance
    (which fsspec itself caches per URL and options).
    """

    def __init__(self, url: str, fs, root: str, config: RepoConfig,
                 storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs = fs
        self.root = root
        self.config = config
        self.storage_options = storage_options or {}

    # -- paths ---------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @staticmethod
    def pack_key(pack_hash: str) -> str:
        return f"packs/{pack_hash[:2]}/{pack_hash}"

    @staticmethod
    def object_key(blob_hash: str) -> str:
        return f"objects/{blob_hash[:2]}/{blob_hash}"

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.fs)

    # -- open / create -------------------------------------------------------
    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None,
             create: bool = False) -> "Repository":
        fs, root = storage.open_url(url, storage_options)
        config_path = storage.join(root, CONFIG_NAME)
        try:
            data = fs.cat_file(config_path)
        except FileNotFoundError:
            data = None
        except IsADirectoryError:
            raise NotARepositoryError(url=url) from None
        except NotADirectoryError:
            # The location (or a folder on its path) is a regular file.
            raise NotARepositoryError(f"{url} is (or lies inside) a file, not a keepflow repository; "
                                      "give the repository's folder or an empty or new location") from None
        except Exception as exc:
            if not storage.is_storage_failure(exc):
                raise
            raise storage.describe_error(url, exc) from None
        if data is None:
            storage.check_container(fs, url)  # a missing bucket is an error, never created
            _check_empty_or_missing(fs, root, url)
            if not create:
                raise RepositoryNotFoundError(url=url)
            return cls._create(url, fs, root, storage_options)
        return cls._from_config_bytes(url, fs, root, data, storage_options)

    @classmethod
    def attach(cls, url: str, config: dict[str, Any], storage_options: dict[str, Any] | None = None) -> "Repository":
        """A repository opened earlier in the same run, from the config that run read.

        A run's plan carries ``keepflow.json`` (its batches may run on other
        machines); each batch attaches instead of reading the file again, which
        on an object store is a request per batch. Nothing is checked here: the
        plan did that, and the commit opens the repository properly again.
        """
        fs, root = storage.open_url(url, storage_options)
        known = {k: config[k] for k in RepoConfig.__dataclass_fields__ if k in config}
        return cls(url, fs, root, RepoConfig(**known), storage_options)

    @classmethod
    def init(cls, url: str, storage_options: dict[str, Any] | None = None,
             config: RepoConfig | None = None) -> "Repository":
        fs, root = storage.open_url(url, storage_options)
        try:
            exists = fs.exists(storage.join(root, CONFIG_NAME))
        except Exception as exc:
            if not storage.is_storage_failure(exc):
                raise
            raise storage.describe_error(url, exc) from None
        if exists:
            raise RepositoryExistsError(url=url)
        storage.check_container(fs, url)
        _check_empty_or_missing(fs, root, url)
        return cls._create(url, fs, root, storage_options, config)

    @classmethod
    def _create(cls, url, fs, root, storage_options, config: RepoConfig | None = None):
        config = config or RepoConfig()
        try:
            fs.makedirs(root, exist_ok=True)
            created = storage.write_once(fs, storage.join(root, CONFIG_NAME), config.to_json())
        except Exception as exc:
            if not storage.is_storage_failure(exc):
                raise
            raise storage.describe_error(url, exc) from None
        if not created:
            # Somebody else created it at the same moment: use theirs.
            data = fs.cat_file(storage.join(root, CONFIG_NAME))
            return cls._from_config_bytes(url, fs, root, data, storage_options)
        return cls(url, fs, root, config, storage_options)

    @classmethod
    def _from_config_bytes(cls, url, fs, root, data, storage_options):
        try:
            config = RepoConfig.from_json(data)
        except (ValueError, TypeError):
            raise NotARepositoryError(
                f"{url}/{CONFIG_NAME} is not a valid keepflow config; "
                "this location is damaged or not a keepflow repository"
            ) from None
        if config.version > FORMAT_VERSION:
            raise RepositoryVersionError(url=url, found=config.version, supported=FORMAT_VERSION)
        return cls(url, fs, root, config, storage_options)


def _check_empty_or_missing(fs, root: str, url: str) -> None:
    """Raise NotARepositoryError when ``root`` holds foreign content."""
    try:
        if not fs.exists(root):
            return
        if not fs.isdir(root):
            raise NotARepositoryError(url=url)
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    except NotARepositoryError:
        raise
    except Exception as exc:
        if not storage.is_storage_failure(exc):
            raise
        raise storage.describe_error(url, exc) from None
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    names.discard("")
    if names - KNOWN_ENTRIES or (names and CONFIG_NAME not in names and names & {"snapshots", "packs"}):
        raise NotARepositoryError(url=url)

"""The repository: its layout, its config file, its keys, and how it is created and opened.

Two formats (ARCHITECTURE.md): version 2, the default for new repositories
(encrypted and authenticated, compressed, content-defined chunks; its own
section there is the specification), and version 1 (plaintext), read and
written as before. ``Repository`` is the only code that builds keys (paths
inside the repository) for both; ``pack.py`` is the only code that knows a
pack's bytes, ``crypto.py`` the only code that encrypts.

Layout of format version 1::

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
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from . import storage
from .errors import (
    NotARepositoryError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    RepositoryVersionError,
)

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .crypto import Subkeys

_HEX64 = re.compile(r"[0-9a-f]{64}")
FORMAT_VERSION = 2                  # the newest format this code reads and writes
DEFAULT_FORMAT = 2                  # what ``init`` makes unless told ``--format 1``
ENCRYPTIONS = ("aes-256-gcm", "none")
CONFIG_NAME = "keepflow.json"
DEFAULT_PACK_SIZE = 16 * 1024 * 1024
DEFAULT_SMALL_FILE_THRESHOLD = 1024 * 1024
# Folders a repository may contain; anything else at the top level means the
# location belongs to somebody else.
KNOWN_ENTRIES = {CONFIG_NAME, "snapshots", "index", "packs", "objects", "locks", "trash", "tmp", "keys"}
# Format 2's fixed choices (ARCHITECTURE.md, "keepflow.json"): part of the
# encrypted config, fixed for the repository's life.
ZSTD_LEVELS = {"fastest": 1, "auto": 3, "max": 9}
CHUNKER = {"name": "fastcdc2020-keyed", "min": 512 * 1024, "avg": 1024 * 1024, "max": 8 * 1024 * 1024, "nc": 2}
HEADER_PAD = 128
COMPRESSIONS = ("auto", "off", "fastest", "max")
# The fields of format 2's encrypted "config" object.
_V2_SEALED = ("pack_size", "small_file_threshold", "compression", "zstd_levels", "chunker", "header_pad", "ids", "aead")


@dataclass
class RepoConfig:
    """``keepflow.json``, both formats. Format 1 stores these fields as plain
    JSON; format 2 keeps version, id, encryption and created_at in the clear
    and the rest in the encrypted ``config`` object (``sealed``, opened once
    the master key is known)."""

    version: int = 1
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    hash: str = "blake3-256"                 # format 1's blob ids
    pack_size: int = DEFAULT_PACK_SIZE
    small_file_threshold: int = DEFAULT_SMALL_FILE_THRESHOLD
    created_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    # Format 1: both None. Format 2: the default compression of backups, and
    # "aes-256-gcm" or "none".
    compression: str | None = None
    encryption: Any = None
    # Format 2 only.
    zstd_levels: dict | None = None
    chunker: dict | None = None
    header_pad: int = HEADER_PAD
    ids: str | None = None
    aead: str | None = None
    sealed: str | None = None                # format 2: the "config" field as read, until opened

    @classmethod
    def new_v2(cls, encryption: str = "aes-256-gcm", compression: str = "auto", **overrides: Any) -> RepoConfig:
        return cls(version=2, hash="", compression=compression, encryption=encryption,
                   zstd_levels=dict(ZSTD_LEVELS), chunker=dict(CHUNKER), header_pad=HEADER_PAD,
                   ids="blake3-256-keyed", aead="aes-256-gcm" if encryption != "none" else "none", **overrides)

    @property
    def encrypted(self) -> bool:
        return self.version >= 2 and self.encryption not in (None, "none")

    def sealed_fields(self) -> dict:
        return {k: getattr(self, k) for k in _V2_SEALED}

    def plain_fields(self) -> dict:
        return {"version": self.version, "id": self.id, "encryption": self.encryption, "created_at": self.created_at}

    def to_json(self, keys: Subkeys | None = None) -> bytes:
        """The file's bytes; format 2 with encryption needs the subkeys to seal the config."""
        if self.version < 2:
            data = {k: v for k, v in asdict(self).items() if k in _V1_FIELDS}
        else:
            data = self.plain_fields()
            if self.encrypted:
                from . import crypto

                if keys is None:
                    raise ValueError("an encrypted format 2 keepflow.json is sealed with the subkeys: pass keys")
                data["config"] = crypto.seal_config(keys, data, self.sealed_fields())
            else:
                data["config"] = self.sealed_fields()
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> RepoConfig:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        version = raw.get("version", 1)
        if not isinstance(version, int):
            raise ValueError("version is not a number")
        if version < 2:
            return cls(**{k: raw[k] for k in _V1_FIELDS if k in raw})
        config = cls(version=version, id=raw["id"], hash="", encryption=raw.get("encryption"),
                     created_at=raw.get("created_at", ""))
        inner = raw.get("config")
        if isinstance(inner, dict):
            config.apply_sealed(inner)
        elif isinstance(inner, str):
            config.sealed = inner
        else:
            raise ValueError("config is missing")
        return config

    def apply_sealed(self, fields: dict) -> None:
        for k in _V2_SEALED:
            if k in fields:
                setattr(self, k, fields[k])
        self.sealed = None

    def to_plan(self) -> dict:
        """What a run's plan carries so batches can attach (the opened config, never a key)."""
        return asdict(self)


_V1_FIELDS = ("version", "id", "hash", "pack_size", "small_file_threshold", "created_at", "compression", "encryption")


class Repository:
    """An opened repository: URL, filesystem, root and config.

    Cheap to create; holds no open connections beyond the fsspec instance
    (which fsspec itself caches per URL and options).
    """

    def __init__(self, url: str, fs: AbstractFileSystem, root: str, config: RepoConfig,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs = fs
        self.root = root
        self.config = config
        self.storage_options = storage_options or {}
        self._keys: Subkeys | None = None

    # -- format ----------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.config.version

    @property
    def encrypted(self) -> bool:
        return self.config.encrypted

    @property
    def keys(self) -> Subkeys:
        """Format 2's subkeys (crypto.Subkeys); None for format 1 (typed as Subkeys: only
        format 2's code reads them, and asserting that at each of its ~30 uses would add
        nothing but noise).

        An encrypted repository is unlocked on first use with the process's
        password (keyring.py: the master key is kept per repository id for
        the life of the process, so the batches of a run derive it once).
        """
        if self.version < 2:
            return None  # type: ignore[return-value]
        if self._keys is None:
            from . import keyring

            self._keys = keyring.subkeys(self)
            if self.config.sealed is not None:
                self._open_sealed_config()
        return self._keys

    def unlock(self) -> Repository:
        """Check the password now (before anything is written); returns self."""
        _ = self.keys
        return self

    def _open_sealed_config(self) -> None:
        from . import crypto

        assert self._keys is not None and self.config.sealed is not None    # the caller's condition
        try:
            fields = crypto.unseal_config(self._keys, self.config.plain_fields(), self.config.sealed)
        except crypto.AuthenticationFailed:
            raise NotARepositoryError(
                f"{self.url}/{CONFIG_NAME} does not authenticate with this repository's key: its config or "
                "its plain fields were changed; restore keepflow.json from a replica") from None
        self.config.apply_sealed(fields)

    def blob_id(self, data: bytes) -> str:
        """The id of a data blob (a small file's bytes, or a chunk), as hex."""
        if self.version < 2:
            return blake3.blake3(data).hexdigest()
        return self.keys.blob_id(data)

    # -- paths (every key inside the repository is built here) ------------------
    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @staticmethod
    def pack_key(pack_hash: str) -> str:
        return f"packs/{pack_hash[:2]}/{pack_hash}"

    @staticmethod
    def object_key(blob_hash: str) -> str:
        """Format 1 only: a large blob stored whole."""
        return f"objects/{blob_hash[:2]}/{blob_hash}"

    @staticmethod
    def key_file_key(name: str) -> str:
        return f"keys/{name}"

    def index_key(self, label: str, stored: bytes | None = None, *, digest: str | None = None) -> str:
        """``index/<label>.parquet`` (format 1), ``index/<label>-<B3 of the file>`` (format 2,
        ``.parquet`` appended when it is not encrypted; ``digest``: that BLAKE3 in hex,
        for a file written from a stream)."""
        if self.version < 2:
            return f"index/{label}.parquet"
        if digest is None:
            if stored is None:
                raise ValueError("format 2 names an index file by its bytes: pass stored or its digest")
            digest = blake3.blake3(stored).hexdigest()
        name = f"{label}-{digest}"
        return f"index/{name}" + ("" if self.encrypted else ".parquet")

    def index_label(self, name: str) -> str | None:
        """The label of an index file name (``index_key``'s inverse); None for a foreign name."""
        if self.version < 2:
            return name[: -len(".parquet")] if name.endswith(".parquet") else None
        if not self.encrypted:
            if not name.endswith(".parquet"):
                return None
            name = name[: -len(".parquet")]
        label, _, digest = name.rpartition("-")
        return label if label and _HEX64.fullmatch(digest) else None

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.fs)

    # -- open / create -------------------------------------------------------
    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None,
             create: bool = False, unlock: bool = True) -> Repository:
        """Open (or, with ``create``, create) the repository at ``url``.

        An encrypted repository is unlocked here unless ``unlock`` is False
        (replication and ``verify --ciphertext-only`` copy and check
        ciphertext, and need no password): a missing or wrong password fails
        before anything is written.
        """
        repo = cls._open(url, storage_options, create)
        if unlock and repo.encrypted:
            repo.unlock()
        return repo

    @classmethod
    def _open(cls, url: str, storage_options: dict[str, Any] | None, create: bool) -> Repository:
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
    def attach(cls, url: str, config: dict[str, Any], storage_options: dict[str, Any] | None = None) -> Repository:
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
             config: RepoConfig | None = None, password: str | None = None) -> Repository:
        """Create a repository (format 2, encrypted, unless ``config`` says otherwise).

        An encrypted one takes ``password`` or asks passwords.get_password
        (confirmed at a terminal); its first key file is written before
        ``keepflow.json``, so a repository never exists without a way in.
        """
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
        return cls._create(url, fs, root, storage_options, config, password)

    @classmethod
    def _create(cls, url, fs: AbstractFileSystem, root: str, storage_options: dict[str, Any] | None,
                config: RepoConfig | None = None,
                password: str | None = None):
        config = config or RepoConfig.new_v2()
        repo = cls(url, fs, root, config, storage_options)
        keys = None
        if config.version >= 2:
            from . import keyring

            keys = keyring.create_first_key(repo, password)   # writes keys/<name> (before keepflow.json)
            repo._keys = keys
        try:
            fs.makedirs(root, exist_ok=True)
            created = storage.write_once(fs, storage.join(root, CONFIG_NAME), config.to_json(keys))
        except Exception as exc:
            if not storage.is_storage_failure(exc):
                raise
            raise storage.describe_error(url, exc) from None
        if not created:
            # Somebody else created it at the same moment: use theirs (our key
            # file, if any, names another repository id and opens nothing).
            data = fs.cat_file(storage.join(root, CONFIG_NAME))
            return cls._from_config_bytes(url, fs, root, data, storage_options)
        return repo

    @classmethod
    def _from_config_bytes(cls, url, fs: AbstractFileSystem, root: str, data: bytes,
                           storage_options: dict[str, Any] | None):
        try:
            config = RepoConfig.from_json(data)
        except (ValueError, TypeError, KeyError):
            raise NotARepositoryError(
                f"{url}/{CONFIG_NAME} is not a valid keepflow config; "
                "this location is damaged or not a keepflow repository"
            ) from None
        if config.version > FORMAT_VERSION:
            raise RepositoryVersionError(url=url, found=config.version, supported=FORMAT_VERSION)
        if config.version >= 2 and config.encryption not in ENCRYPTIONS:
            raise NotARepositoryError(f"{url}/{CONFIG_NAME} names encryption {config.encryption!r}, which this "
                                      f"keepflow does not know ({', '.join(ENCRYPTIONS)}); upgrade keepflow")
        return cls(url, fs, root, config, storage_options)


def _check_empty_or_missing(fs: AbstractFileSystem, root: str, url: str) -> None:
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

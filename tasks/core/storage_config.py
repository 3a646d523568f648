"""Per-URL storage options from a small TOML file.

So that credentials and endpoints need not be typed on every command, a
file maps URL prefixes to fsspec options; the longest matching prefix wins,
and options given explicitly (``--storage-options``, flow parameters) are
laid over it::

    # ~/.config/keepflow/storage.toml  (or the file named by KEEPFLOW_STORAGE_CONFIG)
    ["s3://backups"]
    endpoint_url = "https://s3.example.internal"   # shorthand for client_kwargs.endpoint_url
    profile = "backup"

    ["az://offsite"]
    account_name = "acme"

    ["sftp://backup@nas.lan"]
    client_keys = ["~/.ssh/backup_ed25519"]

Keys are passed to the fsspec filesystem unchanged, except ``endpoint_url``
for S3, which s3fs expects inside ``client_kwargs``.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache

from .errors import UsageError

DEFAULT_PATH = os.path.join(os.path.expanduser("~"), ".config", "keepflow", "storage.toml")


def config_path() -> str:
    return os.environ.get("KEEPFLOW_STORAGE_CONFIG") or DEFAULT_PATH


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[str, dict]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"storage config {path} is not valid TOML ({exc}); fix or remove it") from None
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise UsageError(f"storage config {path}: {bad[0]!r} must be a table like [\"s3://bucket\"] with options")
    return data


def options_for(url: str) -> dict:
    """Options configured for ``url`` (empty when there is no file or no match)."""
    path = config_path()
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return {}
    best = ""
    for prefix in _load(path, mtime):
        if url.startswith(prefix.rstrip("/")) and len(prefix) > len(best):
            best = prefix
    if not best:
        return {}
    options = dict(_load(path, mtime)[best])
    if url.startswith(("s3://", "s3a://")) and "endpoint_url" in options:
        options.setdefault("client_kwargs", {})["endpoint_url"] = options.pop("endpoint_url")
    return options


def merged(url: str, explicit: dict | None) -> dict:
    """Configured options for ``url`` with ``explicit`` ones laid over them."""
    base = options_for(url) if "://" in url else {}
    if not explicit:
        return base
    out = dict(base)
    for key, value in explicit.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out

"""Where a restore reads blobs from: the repository, then replica fallbacks.

Replicas have the same keys as the primary, so a blob that cannot be read
from the primary, or does not match its hash there, is read at the same key,
offset and length from each fallback in turn, and verified again. Opened
repositories are cached per batch; the number of blobs read from each URL
is kept for the run summary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import blake3

from .repository import Repository


class BlobSources:
    """The plan's repository and its fallbacks, opened lazily."""

    def __init__(self, plan: dict, storage_options: dict[str, Any] | None = None) -> None:
        self.primary_url = plan["repo_url"]          # the repository the plan was read from
        self.original_url = plan.get("primary_url") or self.primary_url   # the one the user named
        self.fallback_urls = [u for u in plan.get("fallbacks", []) if u != self.primary_url]
        self.options = storage_options
        self.fallback_options = plan.get("fallback_options") or {}
        self._repos: dict[str, Repository | None] = {}
        self._primary_config = plan.get("repo_config")   # read by the plan: batches need not read it again
        self.used: dict[str, int] = {}

    def repo(self, url: str) -> Repository | None:
        if url not in self._repos:
            opts = self.options if url == self.original_url else self.fallback_options.get(url)
            try:
                if url == self.primary_url and self._primary_config is not None:
                    self._repos[url] = Repository.attach(url, self._primary_config, opts)
                else:
                    self._repos[url] = Repository.open(url, opts)
            except Exception:  # unreachable or damaged: try the next source
                self._repos[url] = None
        return self._repos[url]

    def count(self, url: str, n: int = 1) -> None:
        self.used[url] = self.used.get(url, 0) + n

    def any_repo(self) -> Repository:
        """The primary, or the first fallback that opens when it does not: for what every copy
        shares (keepflow.json, the keys), so a batch whose primary went away since the plan
        still restores from the replicas (before: AttributeError on None)."""
        for url in self.all_urls():
            repo = self.repo(url)
            if repo is not None:
                return repo
        raise OSError(f"{self.primary_url} is unreachable, and so is every fallback")

    def primary_range(self, key: str, start: int, end: int) -> bytes:
        repo = self.repo(self.primary_url)
        if repo is None:
            raise OSError(f"{self.primary_url} is unreachable")
        return repo.fs.cat_file(repo.path(key), start=start, end=end)

    def from_fallbacks(self, key: str, offset: int, length: int, blob_hash: str,
                       check: Callable[[bytes], bytes | None] | None = None) -> tuple[bytes | None, str | None]:
        """A verified copy of the blob from the first fallback that has one: (bytes, None) or (None, problem).

        ``check(stored) -> plaintext | None`` opens a format 2 blob; format 1
        blobs are checked against their BLAKE3.
        """
        problem = f"cannot read a verified copy of {key} from {self.primary_url}"
        for url in self.fallback_urls:
            repo = self.repo(url)
            if repo is None:
                continue
            try:
                blob = repo.fs.cat_file(repo.path(key), start=offset, end=offset + length)
            except OSError:
                continue
            opened = check(blob) if check else (blob if blake3.blake3(blob).hexdigest() == blob_hash else None)
            if opened is not None:
                self.count(url)
                return opened, None
        if self.fallback_urls:
            problem += " or any fallback"
        return None, problem + "; add a --fallback replica to read it from"

    def all_urls(self) -> list[str]:
        return [self.primary_url, *self.fallback_urls]

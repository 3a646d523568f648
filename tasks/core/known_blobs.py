"""The set of blob ids a backup run already has: the index plus this run's writes.

``KnownBlobs`` is shared by the batches of one run in one process; the
per-process cache ``known_blobs(repo, run_id)`` loads it from the index once
per run and process (a Dask worker runs many batches of one run).
"""

from __future__ import annotations

import threading


class KnownBlobs:
    """The set of blob hashes already stored: the index plus this run's writes.

    Shared by the batches of one run in one process (threads). Two sets, both
    guarded by one lock:

    * ``stored``: in the index, or written by a batch of this run that has
      finished (its index file follows before the commit);
    * ``claims``: hash -> the pack writer that will hold it. A batch claims a
      hash before packing it, so a batch running at the same time that meets
      the same content (licences, empty ``__init__.py``: common in real trees)
      does not pack it a second time. When the claiming batch finishes, its
      claims become ``stored``; when it fails, ``release`` drops them so a
      retry (or another batch) stores the data again. Relying on a claim is
      safe: the flow commits only after every batch finished, and the commit
      guard (backup.commit) checks that every hash the manifest references is
      indexed.

    Duplicates that still happen (a retry of a batch whose first pack did land,
    two processes, large files hashed at the same moment) only cost space: the
    index keeps the first location of each hash.
    """

    def __init__(self, hashes=()):
        self._stored = set(hashes)
        self._claims: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._stored)

    def contains(self, blob_hash: str) -> bool:
        return blob_hash in self._stored

    def contains_or_claim(self, blob_hash: str, packer) -> bool:
        """True when the blob is stored or claimed by any batch; else claim it for ``packer``."""
        if blob_hash in self._stored:        # the common case needs no lock (set lookups are atomic)
            return True
        with self._lock:
            if blob_hash in self._stored or blob_hash in self._claims:
                return True
            self._claims[blob_hash] = id(packer)
        packer.claimed.add(blob_hash)
        return False

    def add(self, hashes) -> None:
        with self._lock:
            self._stored.update(hashes)

    def settle(self, packer, stored: bool) -> None:
        """The batch of ``packer`` ended: its claims become stored, or are released."""
        with self._lock:
            for blob_hash in packer.claimed:
                if self._claims.get(blob_hash) == id(packer):
                    del self._claims[blob_hash]
            if stored:
                self._stored.update(packer.claimed)
        packer.claimed = set()


# The per-process known-blob caches, keyed by (repository URL, run id), newest
# last. A run drops its entry when it commits or fails (forget_run; on a Dask
# cluster the flow asks every worker to). A worker whose flow process was
# killed never hears that, so a process keeps at most CACHED_RUNS entries and
# drops the least recently used: a long-lived worker cannot fill up with
# dead runs' sets, and a live run that lost its entry only reloads the index.
CACHED_RUNS = 4
_known_cache: dict[tuple[str, str], KnownBlobs] = {}
_cache_lock = threading.Lock()


def known_blobs(repo, run_id: str) -> KnownBlobs:
    """The run's shared KnownBlobs, loaded from the index once per process."""
    key = (repo.url, run_id)
    with _cache_lock:
        known = _known_cache.pop(key, None)
        if known is None:
            from .index import load_index   # index imports this module
            hashes = load_index(repo, columns=["hash"])["hash"].to_pylist()
            known = KnownBlobs(hashes)
        _known_cache[key] = known                  # most recently used last
        while len(_known_cache) > CACHED_RUNS:
            del _known_cache[next(iter(_known_cache))]
    return known


def forget_run(repo_url: str, run_id: str) -> None:
    with _cache_lock:
        _known_cache.pop((repo_url, run_id), None)


def cached_runs() -> list[tuple[str, str]]:
    """(repository URL, run id) of the runs whose known-blob set this process holds."""
    with _cache_lock:
        return list(_known_cache)

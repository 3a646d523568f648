"""Comparing two snapshots: added, modified and deleted paths, by content.

A vectorised full outer join on ``path``: present only in B is added, only in
A is deleted, in both with a different type, hash or link target is modified.
Metadata-only changes (mode, mtime) are not counted as modifications.

Both formats: ``manifest.read_manifest`` decrypts a format 2 manifest in
memory and gives ``hash`` as hex, so the comparison is the same. In format 2
the same content always has the same content id (a keyed BLAKE3 of the data,
or of the chunk list for a file cut into chunks, and the cut points depend on
the content only), so "modified" means exactly "different content", as in
format 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from . import manifest, snapshots

if TYPE_CHECKING:
    from .repository import Repository

COLUMNS = ["path", "type", "size", "hash", "link_target"]


def compare(repo: Repository, ref_a: str, ref_b: str) -> dict:
    damaged: list[snapshots.DamagedManifest] = []
    snaps = snapshots.list_snapshots(repo, damaged)
    a = snapshots.resolve(repo, ref_a, snapshots=snaps, damaged=damaged)
    b = snapshots.resolve(repo, ref_b, snapshots=snaps, damaged=damaged)
    ta, tb = _read(repo, a), _read(repo, b)
    return compare_tables(ta, tb) | {"a": a.id, "b": b.id}


def _read(repo: Repository, info) -> pa.Table:
    """The manifest's diff columns; DamagedManifestError when it cannot be read or does not
    authenticate (format 2), instead of a raw parsing error."""
    try:
        return manifest.read_manifest(repo, info, columns=COLUMNS)
    except (ValueError, KeyError) as exc:       # ArrowInvalid is a ValueError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise snapshots.DamagedManifest.from_name(info.key, reason).error(repo.url) from None


def compare_tables(ta: pa.Table, tb: pa.Table) -> dict:
    ta = ta.rename_columns([c if c == "path" else f"a_{c}" for c in ta.column_names])
    tb = tb.rename_columns([c if c == "path" else f"b_{c}" for c in tb.column_names])
    j = ta.join(tb, keys="path", join_type="full outer").sort_by("path")
    in_a, in_b = pc.is_valid(j["a_type"]), pc.is_valid(j["b_type"])
    added = j.filter(pc.and_(in_b, pc.invert(in_a)))
    deleted = j.filter(pc.and_(in_a, pc.invert(in_b)))
    both = j.filter(pc.and_(in_a, in_b))
    differs = pc.invert(pc.and_(
        pc.equal(both["a_type"], both["b_type"]),
        pc.and_(_eq_or_both_null(both["a_hash"], both["b_hash"]),
                _eq_or_both_null(both["a_link_target"], both["b_link_target"]))))
    modified = both.filter(differs)

    def rows(t, prefix, extra=None):
        out = []
        for r in t.select(["path", f"{prefix}_type", f"{prefix}_size"] + (extra or [])).to_pylist():
            d = {"path": r["path"], "type": r[f"{prefix}_type"], "size": r[f"{prefix}_size"]}
            if extra:
                d["old_size"] = r[extra[0]]
            out.append(d)
        return out

    return {
        "added": rows(added, "b"),
        "modified": rows(modified, "b", ["a_size"]),
        "deleted": rows(deleted, "a"),
        "summary": {"added": added.num_rows, "modified": modified.num_rows, "deleted": deleted.num_rows,
                    "bytes_added": pc.sum(added["b_size"]).as_py() or 0,
                    "bytes_deleted": pc.sum(deleted["a_size"]).as_py() or 0},
    }


def _eq_or_both_null(x, y):
    both_null = pc.and_(pc.is_null(x), pc.is_null(y))
    return pc.or_(both_null, pc.fill_null(pc.equal(x, y), False))

"""keepflow's @flow stores the same flow-run parameters as Prefect's, without importing FastAPI for plain values."""

from __future__ import annotations

import datetime as dt
import pathlib

from fastapi.encoders import jsonable_encoder

from keepflow.flows._flow import KeepflowFlow, flow


def _fn(source: str, repo: str, tags: list[str] | None = None, storage_options: dict | None = None,
        when: object = None) -> dict:
    return {}


CASES = [
    dict(source="/data", repo="s3://bucket/repo", tags=["a", "b"], storage_options=None),
    dict(source="x", repo="y", storage_options={"key": "k", "client_kwargs": {"endpoint_url": "http://h:1"},
                                                "anon": False, "timeout": 1.5, "retries": 3}),
    dict(source="x", repo="y", tags=("t",)),                                  # a tuple becomes a list
    dict(source=pathlib.Path("/data"), repo="y", when=dt.date(2026, 12, 2)),  # not plain: Prefect's encoder
    dict(source="x", repo="y", storage_options={1: "int key"}),               # not plain: Prefect's encoder
]


def test_same_parameters_as_prefect():
    f = flow(name="t")(_fn)
    assert isinstance(f, KeepflowFlow)
    for case in CASES:
        assert f.serialize_parameters(case) == {k: jsonable_encoder(v) for k, v in case.items()}
        assert list(f.serialize_parameters(case)) == list(case)


def test_with_options_keeps_the_class():
    f = flow(name="t")(_fn).with_options(name="u")
    assert isinstance(f, KeepflowFlow) and f.name == "u"
    assert f.serialize_parameters({"source": "a", "repo": "b"}) == {"source": "a", "repo": "b"}

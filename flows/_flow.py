"""keepflow's ``@flow``: Prefect's, with flow-run parameters stored without importing FastAPI.

Why: when a flow run is created, Prefect turns its parameters into JSON with
``fastapi.encoders.jsonable_encoder`` (``Flow.serialize_parameters``), and the
first call imports FastAPI and Starlette only for that: 0.08-0.19 s of every
command that runs a flow (py-spy, bench/RESULTS.md "Fixed cost"). keepflow's
flow parameters are JSON already (strings, numbers, booleans, None, lists and
string-keyed dicts of those), and for such values the encoder returns an
equal copy; ``KeepflowFlow.serialize_parameters`` makes that copy itself and
hands any other value (a Path, a date, a model: whatever a caller passes from
Python) to Prefect's own method, so what is stored does not change.
"""

from __future__ import annotations

from typing import Any

from prefect.flows import Flow

_SCALARS = (str, int, float, bool, type(None))


def _plain_copy(value: Any) -> tuple[bool, Any]:
    """(True, a copy) when ``value`` is plain JSON data, else (False, None); exact types only."""
    kind = type(value)
    if kind in _SCALARS:
        return True, value
    if kind is list or kind is tuple:
        items = []
        for item in value:
            ok, copy = _plain_copy(item)
            if not ok:
                return False, None
            items.append(copy)
        return True, items
    if kind is dict:
        out = {}
        for key, item in value.items():
            ok, copy = _plain_copy(item)
            if type(key) is not str or not ok:
                return False, None
            out[key] = copy
        return True, out
    return False, None


class KeepflowFlow(Flow):
    """A Prefect flow whose plain JSON parameters are serialised without FastAPI."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in parameters.items():
            ok, copy = _plain_copy(value)
            if ok:
                out[key] = copy
            else:   # Prefect's encoder; it may also leave the key out (a bound method's self)
                out.update(super().serialize_parameters({key: value}))
        return out

    def with_options(self, **options: Any) -> KeepflowFlow:
        new = super().with_options(**options)      # Prefect builds a plain Flow
        new.__class__ = KeepflowFlow               # same attributes; keep this class's methods
        return new


def flow(**options: Any):
    """``@flow(name=..., ...)`` with Prefect's options, making a KeepflowFlow."""
    def decorate(fn):
        return KeepflowFlow(fn=fn, **options)
    return decorate

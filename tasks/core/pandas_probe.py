"""Keeping pyarrow from importing pandas in keepflow's own processes.

pyarrow imports pandas the first time it converts Python objects (``pa.array``,
``pa.table`` of lists), only to check whether they are pandas objects. Nothing
keepflow's commands and batch processes hand it is one, yet that check cost
each process ~0.3 s of CPU and 23 MiB of private memory (32 MiB RSS):
measured on a 1M-file first backup, every batch child imported pandas from
``BatchResult.index_table`` (two children: ~50 MiB of the command's 682 MiB
PSS over its process tree).

Called only where keepflow owns the process (the command, its warm process,
batch children), never at import: a notebook may hand pyarrow a DataFrame.
"""

from __future__ import annotations

import sys


def skip_pyarrow_pandas_probe() -> None:
    """Keep pyarrow from importing pandas for its "is this a pandas object?" check.

    For that one probe pyarrow sees a stand-in module reporting an unsupported
    pandas version: it then skips its pandas integration (quietly, its warning
    is silenced) and the stand-in is removed at once. A later real ``import
    pandas``, and ``Table.to_pandas``, still work.
    """
    if "pandas" in sys.modules:
        return
    import types
    import warnings

    stand_in = types.ModuleType("pandas")
    stand_in.__version__ = "0.0.0"      # type: ignore[attr-defined]
    sys.modules["pandas"] = stand_in
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pyarrow as pa

            pa.array([0])
    finally:
        del sys.modules["pandas"]

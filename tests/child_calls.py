"""Functions a batch child runs in tests/test_batch_processes.py: importable by reference, and light
(importing this module in a child must not import anything the tests look for)."""

from __future__ import annotations

import os
import sys


def arrow_table_from_lists_imports_pandas() -> tuple[int, bool]:
    """Build an Arrow table from Python lists, as BatchResult.index_table does; did pandas get imported?"""
    import pyarrow as pa

    table = pa.table({"hash": ["a", "b"], "length": [1, 2]})
    assert table.num_rows == 2
    return os.getpid(), "pandas" in sys.modules

"""The verify flow: structure checks, then re-hash a random share of the data.

Exit (CLI): 0 clean, 1 problems found. A table artifact lists the problems
with the snapshots and paths they affect; a markdown artifact summarises.
Runnable as ``python -m keepflow verify REPO [--read-data 10%]``.
"""

from __future__ import annotations

import random

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from keepflow.flows import _dask
from keepflow.flows._credentials import resolve
from keepflow.flows._flow import flow
from keepflow.flows._naming import run_name
from keepflow.flows._password import resolve_password_param
from keepflow.flows._runs import HOOKS
from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_OK
from keepflow.tasks.core.format import human_bytes
from keepflow.tasks.verify import attribute_problems, check_ciphertext, check_data, check_structure

DATA_PARTS = 4


@flow(name="verify", flow_run_name=lambda: run_name("verify", "repo"),
      task_runner=ThreadPoolTaskRunner(max_workers=DATA_PARTS), validate_parameters=False, **HOOKS)
def verify(repo: str, read_data: float = 0.0, storage_options: dict | str | None = None,
           dask_address: str | None = None, workers: int | None = None, ciphertext_only: bool = False,
           password: str | None = None) -> dict:
    """Check ``repo``; ``read_data`` is the percentage of stored data to re-hash (0-100).

    ``dask_address`` or ``workers`` re-hash the parts on a Dask cluster (flows/_dask.py).

    ``password`` names a Prefect Secret block (``"secret/NAME"``) holding the
    repository password; left out, the password comes from the environment
    (``KEEPFLOW_PASSWORD``...), never from a flow parameter's value.
    """
    resolve_password_param(password)
    storage_options = resolve(storage_options)
    if ciphertext_only:
        return _ciphertext_only(repo, read_data, storage_options)
    structure = check_structure(repo, storage_options)
    problems = list(structure["problems"])
    keys_read = bytes_read = 0
    parts = DATA_PARTS if read_data > 0 else 0
    if parts:
        seed = random.SystemRandom().randrange(2**31)   # a different sample every run
        with _dask.batches(dask_address, workers) as batches:
            futures = [batches.submit(check_data, repo=repo, percent=read_data, seed=seed, part=i, parts=parts,
                                      storage_options=storage_options) for i in range(parts)]
            for f in futures:
                found = f.result()
                problems += found["problems"]
                keys_read += found["keys_read"]
                bytes_read += found["bytes_read"]
    if problems:
        problems = attribute_problems(repo, problems, storage_options)
    summary = {
        "repository": repo, "snapshots": structure["snapshots"], "blobs": structure["blobs"],
        "keys": structure["keys"], "read_data_percent": read_data, "keys_read": keys_read,
        "bytes_read": bytes_read, "problems": problems, "task_runs": 1 + parts + (1 if problems else 0),
        "exit_code": EXIT_FAILED if problems else EXIT_OK,
    }
    md = (f"# Verify {repo}\n\n{structure['snapshots']} snapshots, {structure['blobs']} blobs in "
          f"{structure['keys']} keys; re-hashed {keys_read} keys ({human_bytes(bytes_read)}, {read_data:g}%).\n\n"
          + (f"**{len(problems)} problems** (see the table artifact)." if problems else "No problems found."))
    create_markdown_artifact(md, key="verify-summary")
    if problems:
        create_table_artifact([{"kind": p["kind"], "key": p["key"] or "", "hash": (p["hash"] or "")[:16],
                                "detail": p["detail"], "snapshots": ", ".join(s[:8] for s in p["snapshots"]),
                                "paths": ", ".join(p["paths"][:5])} for p in problems[:1000]],
                              key="verify-problems")
        return Failed(message=f"{len(problems)} problems found in {repo}", data=summary)
    return summary


def _ciphertext_only(repo: str, read_data: float, storage_options) -> dict:
    found = check_ciphertext(repo, read_data, storage_options)
    problems = found["problems"]
    summary = {"repository": repo, "ciphertext_only": True, "snapshots": found["snapshots"], "blobs": 0,
               "keys": found["keys"], "read_data_percent": read_data, "keys_read": found["keys_read"],
               "bytes_read": found["bytes_read"], "problems": problems, "task_runs": 1,
               "exit_code": EXIT_FAILED if problems else EXIT_OK}
    create_markdown_artifact(
        f"# Verify {repo} (ciphertext only)\n\n{found['snapshots']} snapshots, {found['keys']} packs; every file "
        f"checked against its name, {found['keys_read']} packs read whole. Without the key, tags and "
        "cross-references are not checked.\n\n" + (f"**{len(problems)} problems**." if problems else
                                                  "No problems found."), key="verify-summary")
    if problems:
        return Failed(message=f"{len(problems)} problems found in {repo}", data=summary)
    return summary

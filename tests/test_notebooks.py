"""The notebooks in ``notebooks/`` run, top to bottom, against real repositories.

Each notebook is committed without outputs and has one code cell tagged
``parameters`` (papermill's convention). The test replaces that cell's
source with the test's values, executes the whole notebook with nbclient in
a real ipykernel (matplotlib on the Agg backend), and checks a few printed
answers, so a notebook broken by an API change fails the suite.

Repositories are made with the real backup steps (``tests.core_helpers``):
four snapshots of a small tree that changes between runs, in an encrypted
format 2 repository (what ``init`` makes) and in a format 1 one; for the
replication notebook, a copy of the repository taken after the second
snapshot and a replica that does not exist yet. The kernel gets the
password the way a user's would, from ``KEEPFLOW_PASSWORD`` in the
environment it starts in (tests/conftest.py sets it); no notebook, executed
or committed, holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

from keepflow.tasks.core.repository import RepoConfig, Repository  # noqa: E402

from tests import core_helpers  # noqa: E402
from tests.conftest import TEST_PASSWORD, age_tree, make_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="module", params=["v2", "v1"])
def history(request, tmp_path_factory):
    """A repository with four snapshots, and a copy of it after the second."""
    base = tmp_path_factory.mktemp(f"nb-{request.param}")
    src, repo, copy = base / "src", base / "repo", base / "copy"
    Repository.init(str(repo), config=RepoConfig.new_v2() if request.param == "v2" else RepoConfig())
    make_tree(src, {
        "docs/readme.md": "# notes\n" * 50,
        "docs/guide.txt": "guide\n" * 400,
        "data/big.bin": os.urandom(300_000),
        "data/table.csv": "a,b\n1,2\n",
        "logs/app.log": "start\n",
        "same-as-readme.md": "# notes\n" * 50,
        "empty": None,
    })
    for run in range(4):
        if run:
            (src / "logs/app.log").write_text("start\n" + "line\n" * run * 10)
            (src / f"docs/new-{run}.txt").write_text(f"added in run {run}\n")
        if run == 2:
            (src / "data/table.csv").unlink()
        age_tree(src)
        core_helpers.backup(src, repo)
        if run == 1:
            shutil.copytree(repo, copy)
    assert Repository.open(str(repo)).encrypted == (request.param == "v2")
    return {"repo": str(repo), "copy": str(copy), "missing": str(base / "not-yet"), "format": request.param}


def run_notebook(name: str, parameters: dict, tmp_path: Path, monkeypatch, setup: str = "") -> nbformat.NotebookNode:
    """Execute a notebook with its parameters cell replaced (``setup`` runs first in the kernel)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = setup + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # A kernel spec of our own, so the kernel is this interpreter (the project's venv)
    # whatever other "python3" kernels the machine has installed.
    spec = tmp_path / "jupyter" / "kernels" / "keepflow-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "keepflow test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="keepflow-test",
                                     resources={"metadata": {"path": str(ROOT)}})
    assert os.environ.get("KEEPFLOW_PASSWORD") == TEST_PASSWORD    # the kernel inherits it, as a user's would
    client.execute()  # raises CellExecutionError naming the failing cell
    nbformat.write(nb, tmp_path / name)  # kept for a look when something is off
    assert TEST_PASSWORD not in (tmp_path / name).read_text(), "the password must never reach a notebook"
    return nb


def text_of(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o["text"])
            elif "data" in o and "text/plain" in o["data"]:
                out.append(o["data"]["text/plain"])
    return "\n".join(out)


@pytest.mark.parametrize("name", ["manifest_analysis.ipynb", "replication_status.ipynb"])
def test_notebook_is_committed_clean_with_a_parameters_cell(name):
    raw = json.loads((NOTEBOOKS / name).read_text())
    assert "KEEPFLOW_PASSWORD" in (NOTEBOOKS / name).read_text()       # says where the password comes from
    assert TEST_PASSWORD not in (NOTEBOOKS / name).read_text()
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit notebooks without outputs"
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell holds the parameters"
    # every section (## heading) opens with one short paragraph saying what it shows
    sections = [c for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert len(sections) >= 3
    for c in sections:
        body = c.source.split("\n", 1)[1].strip()
        assert body and "\n\n" not in body, f"section {c.source.splitlines()[0]!r} needs one paragraph"


def test_manifest_analysis_notebook_runs(history, tmp_path, monkeypatch):
    from keepflow.tasks.core import analysis

    nb = run_notebook("manifest_analysis.ipynb",
                      {"repo": history["repo"], "storage_options": None, "snapshot_a": None,
                       "snapshot_b": "latest", "top": 10}, tmp_path, monkeypatch)
    text = text_of(nb)
    assert "4 snapshots from" in text
    assert ("format 2, encrypted" if history["format"] == "v2" else "format 1") in text
    assert "files changed in every run: 1" in text  # logs/app.log
    assert "logs/app.log" in text
    assert "data/big.bin" in text                    # the largest file
    ratio = analysis.dedup_stats(history["repo"]).overall["dedup_ratio"]
    assert f"dedup ratio {ratio:.2f}x" in text       # 4 snapshots of nearly the same 300 KB
    assert ratio > 3.5                               # format 2: each pack has a padded header
    if history["format"] == "v1":
        assert "dedup ratio 3.99x" in text           # format 1 stores blobs as they are
    assert "missing blobs 0" in text and "unreadable: 0" in text
    assert_duckdb_cells(text, history["repo"])
    last_two = analysis.load_snapshots(history["repo"])["short_id"].tolist()[-2:]
    assert f"{last_two[0]} -> {last_two[1]}" in text


def assert_duckdb_cells(text: str, repo: str) -> None:
    """DuckDB's cell: one row per snapshot in time order, then the files with several versions."""
    from keepflow.tasks.core import analysis

    snaps = analysis.load_snapshots(repo)
    rows = [line for line in text.splitlines() if line.startswith("│ ") and line[2:10] in set(snaps["short_id"])]
    assert [r[2:10] for r in rows] == list(snaps["short_id"])
    for row, files in zip(rows, snaps["files"], strict=True):
        assert f" {files} " in row
    versions = next(line for line in text.splitlines() if line.startswith("│ logs/app.log"))
    assert versions.split("│")[2].strip() == "4"     # app.log changed in every run


def test_manifest_analysis_notebook_runs_on_memory_url(history, tmp_path, monkeypatch):
    """An fsspec URL works the same (the kernel copies the repository into its memory://
    filesystem first), DuckDB's cell too: it reads through keepflow, not from a local path."""
    setup = ("import fsspec\n"
             f"fsspec.filesystem('memory').put({history['repo']!r}, '/nb-repo', recursive=True)\n")
    nb = run_notebook("manifest_analysis.ipynb",
                      {"repo": "memory://nb-repo", "storage_options": None, "snapshot_a": None,
                       "snapshot_b": "latest", "top": 5}, tmp_path, monkeypatch, setup=setup)
    text = text_of(nb)
    assert "4 snapshots from" in text
    assert "files changed in every run: 1" in text
    assert_duckdb_cells(text, history["repo"])


def test_replication_status_notebook_runs(history, tmp_path, monkeypatch):
    nb = run_notebook("replication_status.ipynb",
                      {"primary": history["repo"], "replicas": [history["copy"], history["missing"]],
                       "storage_options": {}}, tmp_path, monkeypatch)
    text = text_of(nb)
    assert f"{history['copy']}: 2 snapshots, lacks 2 and" in text
    assert f"{history['missing']}: 0 snapshots, lacks 4 and" in text

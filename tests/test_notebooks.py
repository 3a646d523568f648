"""The notebooks in ``notebooks/`` run, top to bottom, against real repositories.

Each notebook is committed without outputs and has one code cell tagged
``parameters`` (papermill's convention). The test replaces that cell's
source with the test's values, executes the whole notebook with nbclient in
a real ipykernel (matplotlib on the Agg backend), and checks a few printed
answers, so a notebook broken by an API change fails the suite.

Repositories are made with the real backup steps (``tests.core_helpers``):
four snapshots of a small tree that changes between runs; for the
replication notebook, a copy of the repository taken after the second
snapshot and a replica that does not exist yet.
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

from tests import core_helpers  # noqa: E402
from tests.conftest import age_tree, make_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A repository with four snapshots, and a copy of it after the second."""
    base = tmp_path_factory.mktemp("nb")
    src, repo, copy = base / "src", base / "repo", base / "copy"
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
    return {"repo": str(repo), "copy": str(copy), "missing": str(base / "not-yet")}


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
    client.execute()  # raises CellExecutionError naming the failing cell
    nbformat.write(nb, tmp_path / name)  # kept for a look when something is off
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
    from tasks.core import analysis

    nb = run_notebook("manifest_analysis.ipynb",
                      {"repo": history["repo"], "storage_options": None, "snapshot_a": None,
                       "snapshot_b": "latest", "top": 10}, tmp_path, monkeypatch)
    text = text_of(nb)
    assert "4 snapshots from" in text
    assert "files changed in every run: 1" in text  # logs/app.log
    assert "logs/app.log" in text
    assert "data/big.bin" in text                    # the largest file
    assert "dedup ratio 3.99x" in text               # 4 snapshots of nearly the same 300 KB
    assert "missing blobs 0" in text
    # DuckDB's cell: one row per snapshot, in time order
    assert text.count("│ ") >= 4 and "snapshot" in text
    last_two = analysis.load_snapshots(history["repo"])["short_id"].tolist()[-2:]
    assert f"{last_two[0]} -> {last_two[1]}" in text


def test_manifest_analysis_notebook_runs_on_memory_url(history, tmp_path, monkeypatch):
    """An fsspec URL works the same (the kernel copies the repository into its memory://
    filesystem first); DuckDB's cell then says it needs httpfs instead of querying."""
    setup = ("import fsspec\n"
             f"fsspec.filesystem('memory').put({history['repo']!r}, '/nb-repo', recursive=True)\n")
    nb = run_notebook("manifest_analysis.ipynb",
                      {"repo": "memory://nb-repo", "storage_options": None, "snapshot_a": None,
                       "snapshot_b": "latest", "top": 5}, tmp_path, monkeypatch, setup=setup)
    text = text_of(nb)
    assert "4 snapshots from" in text
    assert "files changed in every run: 1" in text
    assert "repository is not on local disk" in text


def test_replication_status_notebook_runs(history, tmp_path, monkeypatch):
    nb = run_notebook("replication_status.ipynb",
                      {"primary": history["repo"], "replicas": [history["copy"], history["missing"]],
                       "storage_options": {}}, tmp_path, monkeypatch)
    text = text_of(nb)
    assert f"{history['copy']}: 2 snapshots, lacks 2 and" in text
    assert f"{history['missing']}: 0 snapshots, lacks 4 and" in text

"""The analysis notebooks run top to bottom (nbclient) on real, tiny runs of the trainer.

Two LoRA runs (r=4, r=8) of minilm on sentiment, 2 steps each, with the task's
default forgetting probes (retrieval applies to an encoder), plus two runs the
notebooks must skip with a note: one finished without probes or adapter, one failed.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
NOTEBOOKS = ["spectra", "forgetting"]
pytestmark = pytest.mark.slow  # trains two tiny runs of a real model, starts two kernels


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from peftlab.config import compose
    from peftlab.training.trainer import run

    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:
        for rank in (4, 8):
            cfg = compose(["model=minilm", "task=sentiment", "method=lora", f"method.r={rank}", f"method.alpha={2 * rank}",
                           "trainer.max_steps=2", "trainer.batch_size=4", "task.max_eval_examples=16",
                           "trainer.progress=false", "trainer.threads=1"])
            result = run(cfg, root / f"lora-r{rank}")
            assert result["status"] == "ok" and result["forgetting"]["probes"].keys() == {"retrieval"}
    finally:
        torch.set_num_threads(threads)  # the trainer sets the process-wide thread count
    finished = json.loads((root / "lora-r4" / "result.json").read_text())
    (root / "no-probes").mkdir()  # finished, but measured no forgetting and saved no adapter
    no_probes = {**finished, "adapter": None}
    no_probes.pop("forgetting")
    (root / "no-probes" / "result.json").write_text(json.dumps(no_probes))
    shutil.copytree(root / "lora-r4", root / "nested" / "failed")  # has an adapter, but did not finish
    (root / "nested" / "failed" / "result.json").write_text(json.dumps({**finished, "status": "failed", "reason": "boom"}))
    return root


def execute(name: str, runs: Path, out: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("PEFTLAB_RUNS", str(runs))
    monkeypatch.setenv("PEFTLAB_ANALYSIS_OUT", str(out))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: tiny matrices, shared cores
    notebook = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ANALYSIS)}}).execute()
    return notebook


def outputs(notebook, tag: str | None = None) -> list:
    cells = [c for c in notebook.cells if c.cell_type == "code" and (tag is None or tag in c.metadata.get("tags", []))]
    return [o for c in cells for o in c.get("outputs", [])]


def printed(notebook) -> str:
    return "".join(o.get("text", "") for o in outputs(notebook) if o.output_type == "stream")


def table_rows(output) -> list[str]:
    """The row labels of a displayed DataFrame (its HTML body's <th> cells)."""
    body = output.data["text/html"].split("<tbody>")[1]
    return re.findall(r"<tr>\s*<th>([^<]*)</th>", body)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_no_outputs(name):
    notebook = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_small_runs(name, runs, tmp_path, monkeypatch):
    notebook = execute(name, runs, tmp_path, monkeypatch)
    assert not [o for o in outputs(notebook) if o.output_type == "error"]
    (table,) = [o for o in outputs(notebook, "runs-table") if "text/html" in o.get("data", {})]
    assert table_rows(table) == ["lora-r4", "lora-r8"]
    assert [o for o in outputs(notebook, "plots") if "image/png" in o.get("data", {})]
    text = printed(notebook)
    assert "skipped nested/failed: status 'failed' (boom)" in text
    reason = "no saved adapter" if name == "spectra" else "no forgetting measured"
    assert f"skipped no-probes: {reason}" in text
    assert list((tmp_path / name).glob("*.png"))
    if name == "spectra":
        assert {"spectra.csv", "ranks.csv", "summary.json"} <= {p.name for p in (tmp_path / name).iterdir()}

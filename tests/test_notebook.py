"""The notebook runs top to bottom on the shared MNIST with a few batches per epoch, through the public API."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tinymnist.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    ids = [c.get("id") for c in nb["cells"]]  # nbformat 4.5 wants a unique id per cell (else a warning, later an error)
    assert None not in ids and len(set(ids)) == len(ids)


def test_public_api_names_exist_in_their_modules():
    import importlib

    import tinymnist

    for name, module in tinymnist._API.items():
        assert getattr(importlib.import_module(f"tinymnist.{module}"), name) is getattr(tinymnist, name)


def test_notebook_runs_top_to_bottom(real_data_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# parameters"))
    params.source = "\n".join([
        "# parameters", f"DATA_DIR = {str(real_data_dir)!r}", 'STEP = None', "EPOCHS = 2",
        "LIMIT_BATCHES = 5", "CHECK_SEEDS = 2", f"OUT = {str(tmp_path / 'out')!r}"])
    NotebookClient(nb, timeout=170, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Receptive field at the output: 28x28" in text
    assert "misclassified of 10,000" in text and ("PASS" in text or "FAIL" in text)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 5  # curves, misclassified grid, confusion matrix, proof, the registered model's proof
    assert "MyNet: PASS" in text or "MyNet: FAIL" in text

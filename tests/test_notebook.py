"""The quick-start notebook runs headless on a small subset, so it never goes stale."""
from pathlib import Path

import pytest

pytestmark = pytest.mark.realdata
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(data_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("TTA_NOTEBOOK_N", "400")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    means = [o for o in outputs if o.output_type == "execute_result" and "'eata'" in o["data"]["text/plain"]]
    assert means, "the cell printing mean errors per method produced no output"
    assert any(o.output_type == "display_data" and "image/png" in o["data"] for o in outputs)
    import tta
    listing = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []) if o.output_type == "stream")
    assert [line.split()[0] for line in listing.strip().splitlines()] == tta.methods.available()

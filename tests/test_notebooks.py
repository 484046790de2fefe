"""The notebooks run as users run them: top to bottom in a real Jupyter kernel (nbclient), on the
CPU with 8 fake devices, from the repository's root."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")

EXPECTED = {  # what each notebook's outputs must show
  "quickstart.ipynb": ["bytes in report.png", "eval/loss"],
  "colab_tpu.ipynb": ["bytes in report.png", "eval/loss", "harness/loom_python_mc/acc", "goodput"],
}


def _text(notebook) -> str:
  out = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      out.append(output.get("text", "") or "".join(output.get("data", {}).get("text/plain", "")))
  return "\n".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs_in_a_kernel(name, tmp_path, monkeypatch):
  # The kernel inherits this environment: the CPU, 8 devices, scratch files under tmp_path.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
  )
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
  text = _text(notebook)
  for expected in EXPECTED[name]:
    assert expected in text, (expected, text[-3000:])

"""The Colab quick start runs as written: every code cell, in order, in a fresh Python process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")


def notebook_script(path: str) -> str:
  """The notebook's code cells as one script (Jupyter's `!` and `%` lines are Colab set-up)."""
  with open(path) as f:
    notebook = json.load(f)
  cells = []
  for cell in notebook["cells"]:
    if cell["cell_type"] != "code":
      continue
    lines = [
      line
      for line in "".join(cell["source"]).splitlines()
      if not line.lstrip().startswith(("!", "%"))
    ]
    cells.append("\n".join(lines))
  return "\n\n".join(cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, tmp_path):
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script(os.path.join(NOTEBOOKS, name)))
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TMPDIR=str(tmp_path),
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  result = subprocess.run(
    [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, textwrap.shorten(result.stderr[-3000:], 3000)
  assert "bytes in report.png" in result.stdout
  assert "eval/loss" in result.stdout

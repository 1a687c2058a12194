"""The notebooks in `colabs/`: stripped, Colab-ready, logic-free, and they run top to bottom.

Every notebook is executed with `nbclient` (kernel `python3`) in smoke mode (`JAXSAE_SMOKE=1`)
and one shared `JAXSAE_WORKDIR`, so the first notebook runs the smoke pipeline and the others
reuse its finished stages.
"""

import ast
import copy
import glob
import importlib.util
import os

from IPython.core import inputtransformer2
import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
# The quickstart first: it runs the pipeline that the other notebooks reuse.
NOTEBOOKS = sorted(glob.glob(os.path.join(COLABS, "*.ipynb")),
                   key=lambda p: (os.path.basename(p) != "quickstart.ipynb", p))
EXPECTED = {"quickstart.ipynb", "e2e_vs_local.ipynb", "features_and_interventions.ipynb"}
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/jaxsae/jaxsae/blob/main/colabs/{}.ipynb)")
CELL_TIMEOUT_S = 600


def _strip_module():
  spec = importlib.util.spec_from_file_location("colabs_strip", os.path.join(COLABS, "strip.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _read(path):
  return nbformat.read(path, as_version=4)


def _name(path):
  return os.path.splitext(os.path.basename(path))[0]


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _python(source):
  """A code cell as plain Python (IPython's `%magic` / `!shell` lines become calls)."""
  return inputtransformer2.TransformerManager().transform_cell(source)


def test_the_three_notebooks_are_there():
  assert EXPECTED <= {os.path.basename(p) for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_is_stripped(path):
  nb = _read(path)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in _code_cells(nb):
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  # The committed file is a fixed point of colabs/strip.py (no run metadata either).
  assert _strip_module().strip(copy.deepcopy(nb)) == nb


def test_strip_clears_an_executed_notebook():
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
  nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                                execution_count=3)]
  nb.cells[0].execution_count = 3
  nb.cells[0].metadata["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00"}
  nb.metadata["language_info"] = {"name": "python", "version": "3.12.0"}
  out = _strip_module().strip(copy.deepcopy(nb))
  assert out.cells[0].outputs == [] and out.cells[0].execution_count is None
  assert "execution" not in out.cells[0].metadata
  assert out.metadata["language_info"] == {"name": "python"}
  assert out.cells[0].source == "1 + 1"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_opens_with_badge_and_install_cell(path):
  cells = _read(path).cells
  assert cells[0].cell_type == "markdown"
  assert cells[0].source.startswith("# ")  # the title
  assert BADGE.format(_name(path)) in cells[0].source
  install = _code_cells(_read(path))[0]  # the first code cell, before any jaxsae import
  src = _python(install.source)
  assert 'if ON_COLAB' in src and 'ON_COLAB = "google.colab" in sys.modules' in src
  assert "pip" in src and "git+https://github.com/jaxsae/jaxsae" in src and "jax[tpu]" in src
  assert "jaxsae import" not in src


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_defines_no_logic_and_has_the_switches(path):
  sources = [c.source for c in _code_cells(_read(path))]
  for source in sources:
    tree = ast.parse(_python(source))
    defs = [type(n).__name__ for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))]
    assert not defs, f"{defs} in a cell of {_name(path)}: move the logic into jaxsae"
  text = "\n".join(sources)
  assert 'SMOKE = os.environ.get("JAXSAE_SMOKE", "0") == "1"' in text
  assert 'os.environ.get("JAXSAE_WORKDIR"' in text
  assert "config.sae.mesh_variant_devices = len(DEVICES)" in text
  assert "jax.devices()" in text
  assert "pipeline.run(config, WORKDIR)" in text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("colab_run"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_runs(path, workdir, monkeypatch):
  monkeypatch.setenv("JAXSAE_SMOKE", "1")
  monkeypatch.setenv("JAXSAE_WORKDIR", workdir)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_NUMPY_RANK_PROMOTION", "raise")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = _read(path)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError, naming the cell, if one fails
  outputs = [o for c in _code_cells(nb) for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert all(c.execution_count is not None for c in _code_cells(nb))
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot shown inline"
  assert os.path.exists(os.path.join(workdir, "report.md"))

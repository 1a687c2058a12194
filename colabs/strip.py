"""Strips outputs, execution counts and per-run metadata from notebooks, in place.

    python colabs/strip.py colabs/*.ipynb

Run it before committing a notebook you executed (`jupyter nbconvert --clear-output` needs
nbconvert, which jaxsae does not depend on). `tests/colabs_test.py` checks that every notebook
in `colabs/` is a fixed point of `strip`.
"""

import sys

import nbformat

_CELL_RUN_METADATA = ("execution", "ExecuteTime", "colab", "outputId", "scrolled", "collapsed")


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """Removes outputs, execution counts and run metadata from `nb` (in place) and returns it."""
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
    for key in _CELL_RUN_METADATA:
      cell.metadata.pop(key, None)
  nb.metadata.pop("widgets", None)
  nb.metadata["language_info"] = {"name": "python"}  # executing adds the kernel's version
  return nb


def main(paths: list[str]) -> None:
  """Strips each notebook file in `paths` in place."""
  if not paths:
    raise SystemExit("usage: python colabs/strip.py NOTEBOOK.ipynb [...]")
  for path in paths:
    nbformat.write(strip(nbformat.read(path, as_version=4)), path)


if __name__ == "__main__":
  main(sys.argv[1:])

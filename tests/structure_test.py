"""The house stays as built: data flows one way through the stage packages.

Read from the source with `ast` (nothing is imported): every import inside `jaxsae/` goes to
the importer's own package or an earlier one in `ORDER`; the jobs that train are imported by
the pipeline and the launcher only; no module reaches another module's private (`_name`)
definitions; no module passes 500 lines.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxsae"
# Stage packages in data-flow order: a module may import from its own package or earlier ones.
ORDER = ("core", "grammars", "lm", "grid", "evaluation", "analysis", "report", "interop",
         "eval_job", "pipeline")
# Training jobs: entry points, not libraries (the trained grid and LM are read through
# `jaxsae.grid.trained` and `jaxsae.lm.bundle`). The pipeline runs them; the SAELens import
# writes an `sae` workdir and validates and fingerprints its config as the `sae` job does.
JOBS = ("jaxsae.lm.train_lm", "jaxsae.grid.train_sae")
JOB_IMPORTERS = ("jaxsae.pipeline", "jaxsae.interop.sae_import")
MAX_LINES = 500


def _modules():
  """Dotted name -> path of every module under jaxsae/."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _stage(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "jaxsae"


def _imports(path: pathlib.Path):
  """(line, imported module, alias or None, imported names) of every jaxsae import in `path`."""
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("jaxsae"):
          yield node.lineno, a.name, a.asname, ()
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxsae"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        if sub in MODULES:  # `from jaxsae.grid import sae`: the module itself
          yield node.lineno, sub, a.asname or a.name, ()
        else:  # `from jaxsae.grid.sae import name`: a name of the module
          yield node.lineno, node.module, None, (a.name,)


def test_the_stage_order_names_every_package():
  stages = {_stage(m) for m in MODULES if m != "jaxsae"}
  assert stages <= set(ORDER), f"packages missing from ORDER: {sorted(stages - set(ORDER))}"


def test_imports_flow_from_earlier_stages_only():
  bad = []
  for module, path in MODULES.items():
    if module == "jaxsae":
      continue
    here = ORDER.index(_stage(module))
    for line, target, _, _ in _imports(path):
      there = _stage(target)
      if there != "jaxsae" and ORDER.index(there) > here:
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (stage {there} comes "
                   f"after {_stage(module)})")
  assert not bad, "imports from a later stage:\n" + "\n".join(bad)


def test_training_jobs_are_imported_by_the_pipeline_only():
  bad = []
  for module, path in MODULES.items():
    if module in JOB_IMPORTERS or module in JOBS:
      continue
    for line, target, _, _ in _imports(path):
      if target in JOBS:
        bad.append(f"{path.relative_to(ROOT)}:{line} imports the job {target}")
  assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module():
  bad = []
  for module, path in MODULES.items():
    aliases = {}
    for line, target, alias, names in _imports(path):
      bad += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names
              if n.startswith("_")]
      if alias:
        aliases[alias] = target
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
          and node.value.id in aliases):
        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses "
                   f"{aliases[node.value.id]}.{node.attr}")
  assert not bad, "private names used outside their module:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
  lines = len(MODULES[module].read_text().splitlines())
  assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines; split it"

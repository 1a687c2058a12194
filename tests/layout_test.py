"""The package layout's import rules, read from the source: data flows one way through the stages,
and the trained grid / LM are read back without the training jobs."""

import ast
import os

import jaxsae

ORDER = ("core", "grammars", "lm", "grid", "evaluation", "analysis", "report", "interop")
ROOT = os.path.dirname(jaxsae.__file__)
# Modules that may import a training job: the pipeline runs them; the SAELens import writes an
# `sae` workdir and validates its config as the `sae` job does.
JOB_IMPORTERS = {"train_lm": {"pipeline"}, "train_sae": {"pipeline", "interop.sae_import"}}
# Imports against the order that are still to be moved: the eval job's report part.
KNOWN_LATE = {"evaluation.evaluate imports report.assemble"}


def _imports():
  """(module, imported jaxsae module) for every `jaxsae` import in the package."""
  out = []
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(dirpath, f)
      module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").replace(".__init__", "")
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxsae"):
          for alias in node.names:
            out.append((module, f"{node.module}.{alias.name}"[len("jaxsae."):]))
        elif isinstance(node, ast.Import):
          out.extend((module, a.name[len("jaxsae."):]) for a in node.names
                     if a.name.startswith("jaxsae."))
  return out


def test_packages_import_only_their_own_or_earlier_ones():
  imports = _imports()
  assert len(imports) > 50
  late = []
  for module, target in imports:
    src, dst = module.split(".")[0], target.split(".")[0]
    if src in ORDER and dst in ORDER and ORDER.index(dst) > ORDER.index(src):
      late.append(f"{module} imports {target}")
  assert set(late) <= KNOWN_LATE, sorted(set(late) - KNOWN_LATE)


def test_only_the_pipeline_imports_the_training_jobs():
  imports = _imports()
  for job, allowed in JOB_IMPORTERS.items():
    importers = {m for m, t in imports if t.split(".")[-1] == job and m.split(".")[-1] != job}
    assert importers and importers <= allowed, (job, sorted(importers - allowed))

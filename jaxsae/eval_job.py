"""The `eval` job: every metric of a trained SAE grid, then the report of it.

`run(config, workdir)` validates the config (`evaluate.validate_config`), evaluates the grid of
`config.sae_workdir` into `<workdir>/eval.json` (`evaluate.run_validated`) and writes
`report.md`, `report.json` and the plots there (`report.from_workdirs.write`, the pipeline's
report without its feature-recovery and causal sections), all under the workdir's writer lock.
The pipeline's eval stage is this job (`run_validated`) in `<pipeline workdir>/eval`.
Evaluation comes before reporting in the package order, so the job that does both lives here,
next to `pipeline.py`.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from jaxsae.core import workdir as workdir_lib
from jaxsae.evaluation import evaluate
from jaxsae.report import from_workdirs


def run(config, workdir: str) -> dict[str, Any]:
  """Evaluates the grid of `config.sae_workdir` and reports on it in `workdir`.

  Returns:
    The eval dict (what `eval.json` holds).

  Raises:
    ValueError: a bad config (before anything is loaded).
    workdir.LockedError: another job is writing to `workdir`.
    workdir.InputMismatchError: `workdir` holds the evaluation of another grid (or checkpoint).
  """
  evaluate.validate_config(config)
  return run_validated(config, workdir)


def run_validated(config, workdir: str) -> dict[str, Any]:
  """`run` of a config that `evaluate.validate_config` has passed (the pipeline's eval stage:
  the pipeline validates every stage up front, once)."""
  with workdir_lib.lock(workdir):
    result = evaluate.run_validated(config, workdir)
    try:
      from_workdirs.write(workdir, sae_dir=config.sae_workdir, eval_results=result)
    except FileNotFoundError:
      logging.warning("No summary.json in %s: report skipped.", config.sae_workdir)
      return result
    logging.info("Wrote %s.", os.path.join(workdir, "report.md"))
  return result

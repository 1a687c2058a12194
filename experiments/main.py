"""Entry point for every jaxsae job.

    python -m experiments.main --config=experiments/configs/<file>.py[:<arg>] --workdir=DIR

The config's `job` field picks the library function; this file only parses flags. Bad configs
fail in `get_config` or in the job's own validation, before anything is compiled; a
`--config.<field>=` override of an unknown field or with a value of the wrong type fails
naming the field (`experiments/overrides.py`).
"""

import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import overrides

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':<arg>'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])

# job name -> module with `run(config, workdir)`
JOBS = {
    "grammar": "jaxsae.grammars.survey",
    "lm": "jaxsae.lm.train_lm",
    "sae": "jaxsae.grid.train_sae",
    "pipeline": "jaxsae.pipeline",
    "eval": "jaxsae.eval_job",
    "export": "jaxsae.interop.export",
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.job not in JOBS:
    raise app.UsageError(f"config.job '{config.job}' is unknown; known jobs: {sorted(JOBS)}")
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  logging.info("job %s, workdir %s", config.job, workdir)
  importlib.import_module(JOBS[config.job]).run(config, workdir)
  # Point at what the job wrote (jobs differ: report.md, summary.json, variants.json, ...).
  for name in ("report.md", "summary.json", "report.json", "variants.json", "metrics.jsonl"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      print(f"{name}: {path}")


def parse_flags(argv):
  """absl's flag parsing, after checking `--config.<field>=` overrides (clear messages)."""
  message = overrides.problem(argv)
  if message:
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.exit(1)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

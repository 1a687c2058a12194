"""The benchmark's cross-language leaderboard of SAE types (`jaxsae/report/leaderboard.py`).

    python -m experiments.leaderboard --out=DIR WORKDIR [WORKDIR ...]

Each WORKDIR is a finished pipeline or study workdir (its `report.json`, e.g. one
`study.py:study=bench,language=<l>` run per language). Writes `leaderboard.md`,
`leaderboard.json` and per-language plots into DIR. This file only parses flags.
"""

import os

from absl import app
from absl import flags

from jaxsae.core import jsonio
from jaxsae.core import stats
from jaxsae.report import leaderboard
from jaxsae.report import leaderboard_output

_OUT = flags.DEFINE_string("out", None, "Directory for leaderboard.md / .json and the plots.")
_N_BOOT = flags.DEFINE_integer("n_boot", stats.N_BOOT, "Bootstrap resamples over seeds.")
_QUANTILES = flags.DEFINE_list("quantiles", ["0.25", "0.5", "0.75"],
                               "Quantiles of the covered CE increases / L0s used as reference "
                               "points.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
flags.mark_flags_as_required(["out"])


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give at least one WORKDIR (a finished pipeline / study workdir with "
                         "report.json) after the flags.")
  reports = []
  for w in workdirs:
    path = os.path.join(w, "report.json")
    report = jsonio.read(path)
    if report is None:
      raise app.UsageError(f"{path} does not exist; finish that run first (rerun its "
                           "`experiments.main` command: finished stages are skipped).")
    reports.append((os.path.basename(os.path.normpath(w)), report))
  try:
    quantiles = [float(q) for q in _QUANTILES.value]
  except ValueError as e:
    raise app.UsageError(f"--quantiles={_QUANTILES.value}: numbers in [0, 1] please") from e
  paths = leaderboard_output.write(_OUT.value, leaderboard.label_reports(reports),
                            quantiles=quantiles, n_boot=_N_BOOT.value, seed=_SEED.value)
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  app.run(main)

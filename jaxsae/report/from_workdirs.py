"""The report of finished jobs, read from their workdirs: the one place that gathers a report's
inputs (the grid's `summary.json`, the evaluation, the analysis' features and causal tests, the
LM's `summary.json`) and hands them to `assemble.write_report`.

Both the pipeline's report stage and the eval job call `write`; which inputs exist decides what
the report shows (an eval job's report has no feature recovery or causal section).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from jaxsae.analysis import stage as analysis_stage
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.report import assemble


def _features(analysis_dir: str) -> dict[str, Any] | None:
  """features.json with the chosen SAEs' correlation matrices of corr.npz, when written."""
  features = jsonio.read(os.path.join(analysis_dir, "features.json"))
  corr_path = os.path.join(analysis_dir, "corr.npz")
  if features is not None and os.path.exists(corr_path):
    with np.load(corr_path) as z:
      features = dict(features, corr={k: z[k] for k in z.files if k != "names"},
                      corr_columns=[str(n) for n in z["names"]])
  return features


def write(out_dir: str, *, sae_dir: str, eval_dir: str | None = None,
          eval_results: Mapping[str, Any] | None = None, analysis_dir: str | None = None,
          lm_dir: str | None = None, meta: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes report.md / report.json / PNGs into `out_dir` from the jobs' outputs.

  Args:
    out_dir: where the report goes.
    sae_dir: the grid's workdir (its `summary.json`).
    eval_dir: the eval workdir (its `eval.json`); or give `eval_results` directly.
    eval_results: the eval dict, in place of reading `eval_dir`.
    analysis_dir: the analysis stage's directory (features.json, corr.npz, causal.json), if
      there is one.
    lm_dir: the LM's workdir (its `summary.json`); default the grid's `lm_workdir`.
    meta: run metadata shown in the report (commit, machine, date, stage seconds).

  Returns:
    name -> path of every file written.

  Raises:
    FileNotFoundError: the grid's summary.json or the evaluation is missing (names the
      stages to run).
  """
  summary = jsonio.read(os.path.join(sae_dir, "summary.json"))
  if eval_results is None and eval_dir is not None:
    eval_results = jsonio.read(os.path.join(eval_dir, "eval.json"))
  if summary is None or eval_results is None:
    raise FileNotFoundError(f"the report needs {sae_dir}/summary.json and "
                            f"{eval_dir or '<eval workdir>'}/eval.json; run the sae and eval "
                            "stages first")
  if lm_dir is None:
    grid_config = workdir_lib.read_config(sae_dir)
    lm_dir = grid_config["lm_workdir"] if grid_config else None
  features = causal = ground = None
  if analysis_dir is not None:
    features = _features(analysis_dir)
    causal = jsonio.read(os.path.join(analysis_dir, "causal.json"))
    ground = jsonio.read(os.path.join(analysis_dir, analysis_stage.GROUND_TRUTH_FILE))
  # The headline spliced grammaticality is the report's default: the corrected splice at the
  # positions the grid was trained on (`assemble.headline_combo`).
  return assemble.write_report(
      out_dir, summary=summary, eval_results=eval_results, features=features,
      causal=(causal or {}).get("variants") or None, ground_truth=ground,
      lm=jsonio.read(os.path.join(lm_dir, "summary.json")) if lm_dir else None, meta=meta,
      training_records=workdir_lib.read_records(os.path.join(sae_dir, "metrics.jsonl")))

"""The whole study in one job: LM → SAE grid → evaluation → feature analysis → report.

`run(config, workdir)` runs five stages, each in its own subdirectory of the workdir, and writes
the report at the top:

    lm/        the language model (`jaxsae.lm.train_lm`; checkpoints, summary.json)
    sae/       the SAE grid (`jaxsae.grid.train_sae`; checkpoints, variants.json, summary.json)
    eval/      every metric of every variant (the eval job, `jaxsae.eval_job`: eval.json and its
               report)
    analysis/  latent × label feature recovery (`jaxsae.analysis.recovery`; features.json, corr.npz) and
               causal predictability of chosen SAEs (`jaxsae.analysis.causality`; causal.json),
               the stage in `jaxsae.analysis.stage`
    report.md, report.json, *.png   (`jaxsae.report.from_workdirs`, as the eval job's report)

One config path: `stage_configs` makes each stage's config from the pipeline's (a copy with the
stage's input paths filled in), `validate_config` checks all of them once, before anything runs,
and each stage runs on its config without checking it again (`run_validated`).

Resuming: a finished stage leaves a record in `stages.json` with a fingerprint of its config
(and of the stages it reads from); rerunning the job skips stages whose record matches and
re-runs the others; a torn stages.json is refused with the fix. The job holds the workdir's
writer lock (each stage also locks its own subdirectory). An interrupted training stage resumes
from its last checkpoint (both are bit-exact on CPU) and the later stages are deterministic
functions of (config, seed), so a killed and rerun pipeline ends with the same numbers as an
uninterrupted one.

Library code: no flag parsing; `experiments/configs/pipeline.py` builds the config.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections

from jaxsae import eval_job
from jaxsae.analysis import stage as analysis_stage
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.evaluation import evaluate
from jaxsae.grid import train_sae
from jaxsae.lm import lm_step
from jaxsae.lm import train_lm
from jaxsae.report import from_workdirs

STAGES = ("lm", "sae", "eval", "analysis", "report")


def _fingerprint(*parts: Any) -> str:
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _with(config: ml_collections.ConfigDict, **updates: Any) -> ml_collections.ConfigDict:
  """An unlocked copy of a stage's config with run-time fields (paths) filled in."""
  c = config.copy_and_resolve_references()
  c.unlock()
  for k, v in updates.items():
    c[k] = v
  return c


def stage_configs(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """Each stage's config: the pipeline's block of it, with the paths of its inputs."""
  paths = _paths(workdir)
  return {"lm": _with(config.lm), "sae": _with(config.sae, lm_workdir=paths["lm"]),
          "eval": _with(config.eval, sae_workdir=paths["sae"]), "analysis": config.analysis}


def _commit() -> str:
  """The git commit of the code (with '+dirty' for local changes), or 'unknown'."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return rev + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def machine() -> str:
  """A one-line description of where this runs (backend, devices, CPU count)."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"{jax.default_backend()} × {len(devices)} ({', '.join(kinds)}); {os.cpu_count()} CPU "
          f"cores; {platform.machine()}; jax {jax.__version__}")


# ------------------------------------------------------------------------------------------------
# Stages.


def _stage_lm(configs, paths) -> None:
  train_lm.run_validated(configs["lm"], paths["lm"])


def _stage_sae(configs, paths) -> None:
  train_sae.run_validated(configs["sae"], paths["sae"])


def _stage_eval(configs, paths) -> None:
  # The pipeline re-runs this stage exactly when the grid or the eval config changed: the old
  # results are replaced, not mixed (the eval workdir would otherwise refuse a changed grid).
  workdir_lib.forget_input(paths["eval"], "grid")
  eval_job.run_validated(configs["eval"], paths["eval"])


def _stage_analysis(configs, paths) -> None:
  analysis_stage.run(configs["analysis"], paths["sae"], paths["analysis"], paths["eval"])


def _stage_report(configs, paths) -> None:
  del configs  # the report reads the stages' outputs only
  write_report(paths["root"], meta=None)


_STAGE_FNS: dict[str, Callable[..., None]] = {
    "lm": _stage_lm, "sae": _stage_sae, "eval": _stage_eval, "analysis": _stage_analysis,
    "report": _stage_report}


def _paths(workdir: str) -> dict[str, str]:
  p = {s: os.path.join(workdir, s) for s in ("lm", "sae", "eval", "analysis")}
  p["root"] = workdir
  return p


def _stage_fingerprints(config) -> dict[str, str]:
  """Each stage's fingerprint covers its own config and those of the stages it reads."""
  fp = {}
  fp["lm"] = _fingerprint(config.lm.to_dict())
  fp["sae"] = _fingerprint(fp["lm"], config.sae.to_dict())
  fp["eval"] = _fingerprint(fp["sae"], config.eval.to_dict())
  fp["analysis"] = _fingerprint(fp["sae"], config.analysis.to_dict())
  fp["report"] = _fingerprint(fp["eval"], fp["analysis"], _REPORT_VERSION)
  return fp


_REPORT_VERSION = 2  # bump when the report's content changes, to re-render old workdirs


def validate_config(config, workdir: str = "<workdir>") -> dict[str, ml_collections.ConfigDict]:
  """Checks the pipeline's own fields and each stage's config, once, before anything runs.

  Returns:
    The stage configs (`stage_configs`) that passed, to run the stages on.
  """
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown or not config.stages:
    raise ValueError(f"config.stages={tuple(config.stages)!r}: choose among {STAGES}")
  if config.sae.language and config.sae.language != config.lm.language:
    raise ValueError(f"config.sae.language={config.sae.language!r} differs from "
                     f"config.lm.language={config.lm.language!r}; set both with :language=")
  configs = stage_configs(config, workdir)
  train_lm.validate_config(configs["lm"])
  train_sae.validate_config(configs["sae"],
                            d_model=lm_step.model_config_for(configs["lm"]).d_model)
  evaluate.validate_config(configs["eval"])
  analysis_stage.validate_config(configs["analysis"])
  if "analysis" in config.stages and config.analysis.causal and _has_transcoders(config.sae.sweep):
    raise ValueError("config.analysis.causal=True, but the sweep trains transcoders "
                     "(target_site): causal predictability edits codes spliced at the SAE's "
                     "own site, which is not where a transcoder's output goes. Set "
                     "analysis.causal=False for transcoder grids")
  return configs


def _has_transcoders(sweep) -> bool:
  """Whether a block of the (validated) sweep gives a non-empty `target_site`."""
  for block in [sweep] if isinstance(sweep, Mapping) else sweep:
    for part in ("product", "zip", "set"):
      v = dict(block.get(part, {})).get("target_site")
      if any(v if isinstance(v, (list, tuple)) else [v]):
        return True
  return False


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage of `config.stages`; returns the stage records."""
  configs = validate_config(config, workdir)
  with workdir_lib.lock(workdir):
    return _run_locked(config, configs, workdir)


def _run_locked(config, configs, workdir: str) -> dict[str, Any]:
  paths = _paths(workdir)
  record_path = os.path.join(workdir, "stages.json")
  records = jsonio.read(record_path, {}, fix=(
      "Delete it and rerun: every stage is then re-entered, and the training stages resume "
      "from their checkpoints (a finished one is not retrained)."))
  workdir_lib.write_config(workdir, config)
  fps = _stage_fingerprints(config)
  order = [s for s in STAGES if s in config.stages]
  t_start = time.perf_counter()
  for i, stage in enumerate(order):
    rec = records.get(stage)
    if rec and rec.get("fingerprint") == fps[stage] and rec.get("done"):
      logging.info("[pipeline %d/%d] %s: done earlier (%.0f s), skipped.", i + 1, len(order),
                   stage, rec.get("seconds", 0.0))
      continue
    spent = sum(r.get("seconds", 0.0) for r in records.values() if r.get("done"))
    logging.info("[pipeline %d/%d] %s: starting (%.0f s spent so far).", i + 1, len(order),
                 stage, spent)
    records[stage] = {"fingerprint": fps[stage], "done": False}
    jsonio.write(record_path, records)
    t0 = time.perf_counter()
    _STAGE_FNS[stage](configs, paths)
    seconds = time.perf_counter() - t0
    records[stage] = {"fingerprint": fps[stage], "done": True, "seconds": round(seconds, 1),
                      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds")}
    jsonio.write(record_path, records)
    # Later stages read this one's outputs: a re-run stage invalidates them.
    for later in order[i + 1:]:
      if records.get(later, {}).get("fingerprint") != fps[later]:
        records.pop(later, None)
    logging.info("[pipeline %d/%d] %s: finished in %.0f s.", i + 1, len(order), stage, seconds)
  logging.info("Pipeline finished in %.0f s this call; report: %s", time.perf_counter() - t_start,
               os.path.join(workdir, "report.md"))
  return records


RERUNNABLE = ("analysis", "report")


def rerun(workdir: str, stages: Sequence[str] = ("analysis",)) -> dict[str, Any]:
  """Re-runs `stages` of a finished workdir with the current code and the workdir's own config
  (`config.json`), e.g. after the analysis changed; the stages before them are kept as they
  are, every stage after the first re-run one is re-run too (the report always). A re-run
  analysis stage's previous outputs are kept in `analysis.prev/` (replacing an older copy).

  Returns:
    The stage records, as `run`.

  Raises:
    ValueError: a stage outside `RERUNNABLE`, no (pipeline) config.json, or a stage before the
      first re-run one that is not finished with that config — all before anything changes.
  """
  stages = list(stages)
  if not stages or any(s not in RERUNNABLE for s in stages):
    raise ValueError(f"rerun stages={stages}: choose among {RERUNNABLE}. The training stages "
                     "resume on their own (rerun the job's command), and the evaluation "
                     "re-runs whenever its config changes.")
  value = workdir_lib.read_config(workdir)
  if value is None or value.get("job") != "pipeline":
    raise ValueError(f"{workdir} holds no pipeline config.json: rerun works on a workdir the "
                     "pipeline job wrote (python -m experiments.main --config=... "
                     f"--workdir={workdir}).")
  config = ml_collections.ConfigDict(value)
  configs = validate_config(config, workdir)
  first = min(STAGES.index(s) for s in stages)
  fps = _stage_fingerprints(config)
  with workdir_lib.lock(workdir):
    record_path = os.path.join(workdir, "stages.json")
    records = jsonio.read(record_path, {})
    for s in STAGES[:first]:
      rec = records.get(s) or {}
      if s in config.stages and not (rec.get("done") and rec.get("fingerprint") == fps[s]):
        fix = (f"rerun from that stage (stages=['{s}'])" if s in RERUNNABLE else
               "finish the run first (rerun its experiments.main command), then rerun")
        raise ValueError(f"stage {s!r} of {workdir} is not finished with its config.json as this "
                         f"code reads it (unfinished, or its config gained fields since): {fix}.")
    if "analysis" in STAGES[first:] and os.path.isdir(os.path.join(workdir, "analysis")):
      prev = os.path.join(workdir, "analysis.prev")
      shutil.rmtree(prev, ignore_errors=True)
      shutil.copytree(os.path.join(workdir, "analysis"), prev)
    for s in STAGES[first:]:
      records.pop(s, None)
    jsonio.write(record_path, records)
    logging.info("rerun of %s in %s with the code of %s.", ", ".join(STAGES[first:]), workdir,
                 _commit())
    return _run_locked(config, configs, workdir)


# ------------------------------------------------------------------------------------------------
# Report stage.


def write_report(workdir: str, meta: dict[str, Any] | None = None) -> dict[str, str]:
  """Renders report.md / report.json / PNGs in `workdir` from the stages' outputs."""
  paths = _paths(workdir)
  stages = jsonio.read(os.path.join(workdir, "stages.json"), {})
  meta = dict(meta or {})
  meta.setdefault("commit", _commit())
  meta.setdefault("machine", machine())
  meta.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"))
  meta.setdefault("stage_seconds", {s: r.get("seconds") for s, r in stages.items()
                                    if r.get("done")})
  return from_workdirs.write(workdir, sae_dir=paths["sae"], eval_dir=paths["eval"],
                             analysis_dir=paths["analysis"], lm_dir=paths["lm"], meta=meta)

"""The whole study in one job: LM → SAE grid → evaluation → feature analysis → report.

`run(config, workdir)` runs five stages, each in its own subdirectory of the workdir, and writes
the report at the top:

    lm/        the language model (`jaxsae.lm.train_lm`; checkpoints, summary.json)
    sae/       the SAE grid (`jaxsae.grid.train_sae`; checkpoints, variants.json, summary.json)
    eval/      every metric of every variant (`jaxsae.evaluation.evaluate`; eval.json)
    analysis/  latent × label feature recovery (`jaxsae.analysis.recovery`; features.json, corr.npz) and
               causal predictability of chosen SAEs (`jaxsae.analysis.causality`; causal.json)
    report.md, report.json, *.png   (`jaxsae.report.assemble`)

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
import subprocess
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from jaxsae.analysis import causality
from jaxsae.analysis import codes as codes_lib
from jaxsae.analysis import comparison
from jaxsae.analysis import recovery
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.evaluation import evaluate
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sae_groups
from jaxsae.grid import train_sae
from jaxsae.grid import trained as trained_lib
from jaxsae.lm import lm_step
from jaxsae.lm import train_lm
from jaxsae.report import assemble as report_lib

STAGES = ("lm", "sae", "eval", "analysis", "report")
_ANALYSIS_STREAM = 2000  # folded into the analysis seed (never a training or eval stream)


def _fingerprint(*parts: Any) -> str:
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sub_config(config: ml_collections.ConfigDict, **updates: Any) -> ml_collections.ConfigDict:
  """An unlocked copy of a stage's config with run-time fields (paths) filled in."""
  c = ml_collections.ConfigDict(config.to_dict())
  for k, v in updates.items():
    c[k] = v
  return c


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


def _stage_lm(config, paths) -> None:
  train_lm.run(_sub_config(config.lm), paths["lm"])


def _stage_sae(config, paths) -> None:
  train_sae.run(_sub_config(config.sae, lm_workdir=paths["lm"]), paths["sae"])


def _stage_eval(config, paths) -> None:
  # The pipeline re-runs this stage exactly when the grid or the eval config changed: the old
  # results are replaced, not mixed (the eval workdir would otherwise refuse a changed grid).
  workdir_lib.forget_input(paths["eval"], "grid")
  evaluate.run(_sub_config(config.eval, sae_workdir=paths["sae"]), paths["eval"])


def _stage_analysis(config, paths) -> None:
  run_analysis(config.analysis, paths["sae"], paths["analysis"], paths["eval"])


def _stage_report(config, paths) -> None:
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


def validate_config(config) -> None:
  """Checks the pipeline's own fields and each stage's config, before anything runs."""
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown or not config.stages:
    raise ValueError(f"config.stages={tuple(config.stages)!r}: choose among {STAGES}")
  if config.sae.language and config.sae.language != config.lm.language:
    raise ValueError(f"config.sae.language={config.sae.language!r} differs from "
                     f"config.lm.language={config.lm.language!r}; set both with :language=")
  train_lm.validate_config(config.lm)
  train_sae.validate_config(config.sae)
  sae_groups.build_groups(list(config.sae.sweep), lm_step.model_config_for(config.lm).d_model)
  evaluate.validate_config(_sub_config(config.eval, sae_workdir="<sae>"))
  a = config.analysis
  for name in ("num_sequences", "max_pairs", "heatmap_latents"):
    if not isinstance(a[name], int) or a[name] < 1:
      raise ValueError(f"config.analysis.{name}={a[name]!r} must be a positive int")
  if not 0 < a.threshold <= 1:
    raise ValueError(f"config.analysis.threshold={a.threshold} must lie in (0, 1]")


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage of `config.stages`; returns the stage records."""
  validate_config(config)
  with workdir_lib.lock(workdir):
    return _run_locked(config, workdir)


def _run_locked(config, workdir: str) -> dict[str, Any]:
  paths = _paths(workdir)
  record_path = os.path.join(workdir, "stages.json")
  records = jsonio.read(record_path, {}, fix=(
      "Delete it and rerun: every stage is then re-entered, and the training stages resume "
      "from their checkpoints (a finished one is not retrained)."))
  jsonio.write(os.path.join(workdir, "config.json"), config.to_dict())
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
    _STAGE_FNS[stage](config, paths)
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


# ------------------------------------------------------------------------------------------------
# Analysis stage.


def _choose(variants: dict[str, Any], types: dict[str, str], score: dict[str, float]) -> list[str]:
  """One variant per SAE type: the best by `score` (higher is better), ids sorted."""
  best: dict[str, tuple[float, str]] = {}
  for vid in variants:
    s = score.get(vid, float("-inf"))
    t = types[vid]
    if t not in best or s > best[t][0]:
      best[t] = (s, vid)
  return sorted(v for _, v in best.values())


def run_analysis(a, sae_workdir: str, out_dir: str, eval_dir: str | None = None) -> dict[str, Any]:
  """Feature recovery for every variant and causal predictability for one SAE per type.

  Writes `features.json` (`recovery.summarise` of every variant, keyed by id), `corr.npz`
  (latent × label correlations of the chosen SAEs, for heatmaps) and `causal.json`
  (`causality.causal_predictability` of the chosen SAEs) in `out_dir`.

  Args:
    a: the analysis config (`num_sequences`, `seed`, `threshold`, `max_pairs`, `causal`,
      `causal_variants` ('per_type': the chosen SAE of each type; 'all'), `heatmap_latents`).
    sae_workdir: the trained grid.
    out_dir: where to write.
    eval_dir: optional eval workdir; the chosen SAE of a type is the one with the best
      feature-recovery score among those whose spliced CE increase is finite.
  """

  os.makedirs(out_dir, exist_ok=True)
  trained = trained_lib.load(sae_workdir)
  setup = trained.setup
  key = jax.random.fold_in(jax.random.key(a.seed), _ANALYSIS_STREAM)
  batch = codes_lib.analysis_batch(trained, key, a.num_sequences)
  lmat = batch.label_matrix()
  features: dict[str, Any] = {"columns": None, "variants": {}}
  corr: dict[str, np.ndarray] = {}
  hparams_by_id = {}
  t0 = time.perf_counter()
  for gi, spec in enumerate(setup.specs):
    codes = codes_lib.collect_codes(trained, gi, batch.tokens_BT, batch.mask_BT)
    params = jax.tree.map(lambda x: x[: spec.size], trained.state.groups[gi].params)
    decoders = jax.vmap(lambda p, c=spec.sae: sae_lib.dictionary(p, c))(params)
    summ = recovery.summarise(codes, lmat, decoders, ids=list(spec.ids))
    features["columns"] = summ["columns"]
    features["variants"].update(summ["variants"])
    cmat = np.asarray(recovery.correlations(codes, lmat))
    for i, vid in enumerate(spec.ids):
      corr[vid] = cmat[i]
      hparams_by_id[vid] = spec.values[i]
    elapsed = time.perf_counter() - t0
    eta = elapsed / (gi + 1) * (len(setup.specs) - gi - 1)
    logging.info("analysis: group %d/%d (%s, %d SAEs) done, ETA %.0f s", gi + 1,
                 len(setup.specs), spec.name, spec.size, eta)
  names = [c["name"] for c in features["columns"]]
  jsonio.write(os.path.join(out_dir, "features.json"), features)

  types = {vid: comparison.sae_type(dict(h)) for vid, h in hparams_by_id.items()}
  ev = jsonio.read(os.path.join(eval_dir, "eval.json"), {}) if eval_dir else {}
  ok = {vid for vid, v in ev.get("variants", {}).items()
        if isinstance(v.get("ce_increase"), (int, float)) and np.isfinite(v["ce_increase"])}
  score = {vid: float(s.get("mean_best_abs_corr", float("-inf")))
           for vid, s in features["variants"].items() if not ok or vid in ok}
  chosen = _choose(hparams_by_id, types, score)
  tested = sorted(hparams_by_id) if a.get("causal_variants", "per_type") == "all" else chosen
  np.savez_compressed(os.path.join(out_dir, "corr.npz"), names=np.asarray(names),
                      **{vid: corr[vid] for vid in chosen})

  causal: dict[str, Any] = {"chosen": chosen, "types": {v: types[v] for v in tested},
                            "variants": {}}
  if a.causal:
    for n, vid in enumerate(tested):
      v = trained.variant(vid)
      t1 = time.perf_counter()
      res = causality.causal_predictability(
          causality.SplicedSAE(trained.lm.params, setup.model_config, setup.site, v.params,
                               v.sae_config, v.hparams, v.splice_mode, v.sae_state),
          batch.tokens_BT, batch.mask_BT, setup.grammar, np.nan_to_num(corr[vid]), names,
          causality.CausalSettings(threshold=a.threshold, max_pairs=a.max_pairs,
                                   empirical_fallback=True))
      causal["variants"][vid] = res
      logging.info("analysis: causal predictability %d/%d (%s, %s): %s of %s pairs as "
                   "predicted (%.0f s)", n + 1, len(tested), vid, types[vid],
                   res.get("fraction_as_predicted"), res.get("n_tested"),
                   time.perf_counter() - t1)
  jsonio.write(os.path.join(out_dir, "causal.json"), jsonio.jsonable(causal))
  return {"features": features, "causal": causal}


# ------------------------------------------------------------------------------------------------
# Report stage.


def write_report(workdir: str, meta: dict[str, Any] | None = None) -> dict[str, str]:
  """Renders report.md / report.json / PNGs in `workdir` from the stages' outputs."""
  paths = _paths(workdir)
  summary = jsonio.read(os.path.join(paths["sae"], "summary.json"))
  eval_results = jsonio.read(os.path.join(paths["eval"], "eval.json"))
  if summary is None or eval_results is None:
    raise FileNotFoundError(f"the report needs {paths['sae']}/summary.json and "
                            f"{paths['eval']}/eval.json; run the sae and eval stages first")
  features = jsonio.read(os.path.join(paths["analysis"], "features.json"))
  corr_path = os.path.join(paths["analysis"], "corr.npz")
  if features is not None and os.path.exists(corr_path):
    with np.load(corr_path) as z:
      features = dict(features, corr={k: z[k] for k in z.files if k != "names"},
                      corr_columns=[str(n) for n in z["names"]])
  causal = jsonio.read(os.path.join(paths["analysis"], "causal.json"))
  stages = jsonio.read(os.path.join(workdir, "stages.json"), {})
  meta = dict(meta or {})
  meta.setdefault("commit", _commit())
  meta.setdefault("machine", machine())
  meta.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"))
  meta.setdefault("stage_seconds", {s: r.get("seconds") for s, r in stages.items()
                                    if r.get("done")})
  # The headline spliced grammaticality is the report's default: the corrected splice at the
  # positions the grid was trained on (`report.headline_combo`).
  return report_lib.write_report(
      workdir, summary=summary, eval_results=eval_results, features=features,
      causal=(causal or {}).get("variants") or None,
      lm=jsonio.read(os.path.join(paths["lm"], "summary.json")), meta=meta)

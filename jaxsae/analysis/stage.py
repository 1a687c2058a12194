"""The analysis stage of the pipeline: feature recovery of every SAE of a trained grid and
causal predictability of chosen ones.

`validate_config(a)` checks the stage's config (`experiments/configs/pipeline.py`'s
`analysis` block) before anything runs; `run(a, sae_workdir, out_dir, eval_dir)` writes
`features.json`, `corr.npz`, `causal.json` and, with `ground_truth`, `ground_truth.json`
(`analysis.ground_truth.ground_truth_summary` of every variant; see `run`). The data comes from
the grid's own held-out stream under the analysis seed (`STREAM` folded in, never a training
or eval stream), so the stage is a deterministic function of (config, grid).
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from jaxsae.analysis import causality
from jaxsae.analysis import codes as codes_lib
from jaxsae.analysis import comparison
from jaxsae.analysis import ground_truth
from jaxsae.analysis import hierarchy as hierarchy_lib
from jaxsae.analysis import recovery
from jaxsae.core import jsonio
from jaxsae.core import stats
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import trained as trained_lib

STREAM = 2000  # folded into the analysis seed (never a training or eval stream)
CAUSAL_VARIANTS = ("per_type", "all")
GROUND_TRUTH_FILE = "ground_truth.json"  # `ground_truth.ground_truth_summary` of every variant


def validate_config(a) -> None:
  """Checks the analysis config (before anything runs).

  Raises:
    ValueError: naming the field at fault and the accepted values.
  """
  for name in ("num_sequences", "max_pairs", "heatmap_latents"):
    if not isinstance(a[name], int) or a[name] < 1:
      raise ValueError(f"config.analysis.{name}={a[name]!r} must be a positive int")
  if not 0 < a.threshold <= 1:
    raise ValueError(f"config.analysis.threshold={a.threshold} must lie in (0, 1]")
  least = stats.min_null_size()
  if isinstance(a.null_latents, bool) or not isinstance(a.null_latents, int) or (
      a.null_latents < least):
    raise ValueError(f"config.analysis.null_latents={a.null_latents!r} must be an int >= {least}: "
                     "with fewer null latents no causal effect can pass the 95% test")
  if not isinstance(a.ground_truth, bool):
    raise ValueError(f"config.analysis.ground_truth={a.ground_truth!r} must be True or False")
  if a.causal_variants not in CAUSAL_VARIANTS:
    raise ValueError(f"config.analysis.causal_variants={a.causal_variants!r}: use one of "
                     f"{CAUSAL_VARIANTS}")


def choose(variants, types: dict[str, str], score: dict[str, float]) -> list[str]:
  """One variant per SAE type: the best by `score` (higher is better), ids sorted."""
  best: dict[str, tuple[float, str]] = {}
  for vid in variants:
    s = score.get(vid, float("-inf"))
    t = types[vid]
    if t not in best or s > best[t][0]:
      best[t] = (s, vid)
  return sorted(v for _, v in best.values())


def run(a, sae_workdir: str, out_dir: str, eval_dir: str | None = None) -> dict[str, Any]:
  """Feature recovery for every variant and causal predictability for one SAE per type.

  Writes `features.json` (`recovery.summarise` of every variant, keyed by id), `corr.npz`
  (latent × label correlations of the chosen SAEs, for heatmaps) and `causal.json`
  (`causality.causal_predictability` of the chosen SAEs) in `out_dir`.

  Args:
    a: the analysis config (`num_sequences`, `seed`, `threshold`, `max_pairs`, `null_latents`,
      `causal`, `causal_variants` ('per_type': the chosen SAE of each type; 'all'),
      `heatmap_latents`),
      passed by `validate_config`.
    sae_workdir: the trained grid.
    out_dir: where to write.
    eval_dir: optional eval workdir; the chosen SAE of a type is the one with the best
      feature-recovery score among those whose spliced CE increase is finite.

  Transcoder grids (`target_site`): features and ground truth are read from the codes of MLP
  l's input as for SAEs, without shrinkage (x̂ stands for the MLP output, not the input);
  causal predictability splices at the SAE's site and is refused (`a.causal=False`).

  Raises:
    ValueError: `a.causal` on a transcoder grid (before anything runs).
  """
  trained = trained_lib.load(sae_workdir)
  setup = trained.setup
  transcoders = [s.name for s in setup.specs if s.target_site]
  if a.causal and transcoders:
    raise ValueError(f"analysis.causal: the grid's groups {', '.join(transcoders)} are "
                     "transcoders, and causal predictability edits codes spliced at the SAE's "
                     "own site (mlp_in), not at the MLP output they stand for; set "
                     "analysis.causal=False for transcoder grids")
  os.makedirs(out_dir, exist_ok=True)
  key = jax.random.fold_in(jax.random.key(a.seed), STREAM)
  batch = codes_lib.analysis_batch(trained, key, a.num_sequences)
  lmat = batch.label_matrix()
  # The SAE inputs, once for every group (the frozen LM's activations at the site).
  acts_MD = codes_lib.site_activations(trained, batch.tokens_BT, batch.mask_BT)
  ground: dict[str, Any] | None = None
  if a.ground_truth:  # the grammar's features and their hierarchy, once
    tokens_M = batch.tokens_BT[batch.mask_BT]
    hier = hierarchy_lib.grammar_hierarchy(setup.grammar, lmat, tokens_M)
    ground = {"variants": {}}
  features: dict[str, Any] = {"columns": None, "variants": {}}
  corr: dict[str, np.ndarray] = {}
  hparams_by_id = {}
  t0 = time.perf_counter()
  for gi, spec in enumerate(setup.specs):
    codes = codes_lib.collect_codes(trained, gi, batch.tokens_BT, batch.mask_BT, acts_MD=acts_MD)
    params = jax.tree.map(lambda x: x[: spec.size], trained.state.groups[gi].params)
    decoders = jax.vmap(lambda p, c=spec.sae: sae_lib.dictionary(p, c))(params)
    summ = recovery.summarise(codes, lmat, decoders, ids=list(spec.ids))
    if ground is not None:
      # Shrinkage compares x̂ with x in one space: skipped for normalised SAEs, and for
      # transcoders (x̂ stands for the MLP output, acts_MD is the MLP input).
      normalised = spec.sae.input_norm or spec.sae.recon_norm or bool(spec.target_site)
      recon = None if normalised else codes_lib.reconstructions(trained, gi, codes)
      gt = ground_truth.ground_truth_summary(codes, lmat, hier, acts_MD, recon,
                                             ids=list(spec.ids))
      ground.update({k: v for k, v in gt.items() if k != "variants"})
      ground["variants"].update(gt["variants"])
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
  if ground is not None:
    jsonio.write(os.path.join(out_dir, GROUND_TRUTH_FILE), ground)

  types = {vid: comparison.sae_type(dict(h)) for vid, h in hparams_by_id.items()}
  ev = jsonio.read(os.path.join(eval_dir, "eval.json"), {}) if eval_dir else {}
  ok = {vid for vid, v in ev.get("variants", {}).items()
        if isinstance(v.get("ce_increase"), (int, float)) and np.isfinite(v["ce_increase"])}
  score = {vid: float(s.get("mean_best_abs_corr", float("-inf")))
           for vid, s in features["variants"].items() if not ok or vid in ok}
  chosen = choose(hparams_by_id, types, score)
  tested = sorted(hparams_by_id) if a.causal_variants == "all" else chosen
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
                                   null_latents=a.null_latents,
                                   empirical_fallback=True))
      causal["variants"][vid] = res
      logging.info("analysis: causal predictability %d/%d (%s, %s): %s of %s pairs as "
                   "predicted (%.0f s)", n + 1, len(tested), vid, types[vid],
                   res.get("fraction_as_predicted"), res.get("n_tested"),
                   time.perf_counter() - t1)
  jsonio.write(os.path.join(out_dir, "causal.json"), jsonio.jsonable(causal))
  return {"features": features, "causal": causal, "ground_truth": ground}

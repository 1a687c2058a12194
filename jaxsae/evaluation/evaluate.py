"""Evaluation of an SAE grid: every metric of specs/sae.md for all variants of a group at once.

The evaluation of the `eval` job (`run(config, workdir)`; the job itself, evaluation then report,
is `jaxsae.eval_job`) reads a finished `sae` workdir (`trained.load`),
evaluates every variant on a held-out data stream and writes `eval.json`; it holds the eval
workdir's writer lock and records the grid's identity there (`inputs.json`), refusing to write
the results of a changed grid over those of the old one. This module drives
the passes over batches and groups (`reference`, `evaluate_group`), evaluates a whole grid
(`evaluate_trained`) and holds the job; the held-out data, the compiled passes and the metric
definitions (which tokens count, where the SAE is spliced, every metric's formula) are in
`eval_passes.py`. The per-token formulas are in `metrics.py`, spliced
grammaticality (generation with the SAE spliced in) in `spliced_generation.py`, feature recovery
in `analysis/recovery.py` and dictionary geometry in `geometry.py`. Transcoder grids
(`target_site`) are evaluated against, and spliced in place of, MLP l's output (`eval_passes`,
`spliced_generation`); a group is evaluated with its own grid's setup (`eval_passes.check_target`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import grammars
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.evaluation import eval_passes
from jaxsae.evaluation import partial
from jaxsae.evaluation import spliced_generation
from jaxsae.grid import grid_step
from jaxsae.grid import metrics as metrics_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sae_groups
from jaxsae.grid import sweep as sweep_lib
from jaxsae.grid import trained as trained_lib
from jaxsae.lm import generate as generate_lib


# ------------------------------------------------------------------------------------------------
# Driving the passes over batches and groups.


@dataclasses.dataclass(frozen=True)
class _GroupInput:
  spec: sae_groups.GroupSpec
  params: Any
  sae_state: sae_lib.SAEState
  hparams: sae_lib.SAEHparams
  splice_mode: str
  variant_loop: str


def _variant_loop(setup: grid_step.Setup) -> str:
  return getattr(setup, "variant_loop", "vmap")


def _check_group_input(g: _GroupInput) -> None:
  if g.variant_loop not in ("vmap", "map"):
    raise ValueError(f"variant_loop={g.variant_loop!r}: use 'vmap', 'map' or None (the grid's)")
  if g.splice_mode not in sae_lib.SPLICE_MODES:
    raise ValueError(f"splice_mode={g.splice_mode!r}: use one of {sae_lib.SPLICE_MODES} (or "
                     "None for the group's own)")
  for leaf in jax.tree.leaves((g.params, g.sae_state, g.hparams)):
    if leaf.shape[:1] != (g.spec.padded,):
      raise ValueError(f"group {g.spec.name}: SAE params / state / hparams must be stacked on a "
                       f"leading axis of spec.padded={g.spec.padded}, got a leaf of shape "
                       f"{leaf.shape}; pass the group's GroupState / GroupHyper as trained")


def reference(lm_params, data: eval_passes.HeldOut,
              setup: grid_step.Setup) -> eval_passes.Reference:
  """The first pass: held-out means of the clean activations over the masked tokens."""
  st = eval_passes.static_for(setup, "sentence")
  totals: dict[str, np.ndarray] = {}
  count = 0
  for k in range(data.num_batches):
    s = jax.device_get(eval_passes.reference_sums(lm_params, data.tokens_KBT[k],
                                                  data.mask_KBT[k], st=st))
    for name, v in s.items():
      totals[name] = totals.get(name, 0.0) + np.asarray(v, np.float64)
    count += int(data.mask_KBT[k].sum())
  if count == 0:
    raise ValueError("the held-out set selects no tokens (empty mask); use more / larger "
                     "batches or mask_positions='all'")
  mean = lambda v: jnp.asarray(v / count, jnp.float32)
  return eval_passes.Reference(mean_D=mean(totals["x"]), ln_mean_D=mean(totals["ln"]),
                               ds_mean={h: mean(totals[f"ds/{h}"]) for h in st.ds_sites})


def _accumulate(total, name: str, value):
  """Adds one batch's sum to `total`, or appends its per-sequence sums (`SEQ_PREFIX` names)."""
  if name.startswith(eval_passes.SEQ_PREFIX):
    value = np.asarray(value, np.float64)
    return value if total is None else np.concatenate([total, value], axis=-1)
  if np.ndim(value) == 0 and not isinstance(total, np.ndarray):
    return (total or 0.0) + float(value)
  return (0.0 if total is None else total) + np.asarray(value, np.float64)


def _evaluate(groups: Sequence[_GroupInput], lm_params, data: eval_passes.HeldOut,
              setup: grid_step.Setup,
              *, positions: str, window_tokens: int, ref: eval_passes.Reference | None = None
              ) -> tuple[dict[str, float], list[dict[str, np.ndarray]]]:
  """Both passes for several groups; returns (clean sums, per-group finalized metrics)."""
  eval_passes.check_options(positions=positions, window_tokens=window_tokens)
  for g in groups:
    _check_group_input(g)
  st = eval_passes.static_for(setup, positions)
  ref = reference(lm_params, data, setup) if ref is None else ref
  window = window_tokens or eval_passes.ALL_WINDOW
  clean_tot: dict[str, float] = {}
  group_tot: list[dict[str, np.ndarray]] = [{} for _ in groups]
  fired_tot: list[np.ndarray | None] = [None for _ in groups]
  seen = 0
  for k in range(data.num_batches):
    left = jnp.int32(max(window - seen, 0))
    c, csums = eval_passes.clean_pass(lm_params, data.tokens_KBT[k], data.next_KBT[k],
                                      data.mask_KBT[k], data.valid_KBTV[k], ref, left, st=st)
    outs = []
    for g in groups:
      gst = eval_passes.GroupStatic(base=st, sae=g.spec.sae, splice_mode=g.splice_mode,
                                    variant_loop=g.variant_loop)
      outs.append(eval_passes.group_pass(g.params, g.sae_state, g.hparams, lm_params, c, ref,
                                         st=gst))
    csums, outs = jax.device_get((csums, outs))
    for name, v in csums.items():
      clean_tot[name] = _accumulate(clean_tot.get(name), name, v)
    for i, (sums, fired) in enumerate(outs):
      for name, v in sums.items():
        group_tot[i][name] = _accumulate(group_tot[i].get(name), name, v)
      fired = np.asarray(fired, np.int64)
      fired_tot[i] = fired if fired_tot[i] is None else fired_tot[i] + fired
    seen += int(data.mask_KBT[k].sum())
  results = []
  for g, sums, fired in zip(groups, group_tot, fired_tot):
    gst = eval_passes.GroupStatic(base=st, sae=g.spec.sae, splice_mode=g.splice_mode,
                                  variant_loop=g.variant_loop)
    m = eval_passes.finalize(clean_tot, sums, fired, gst)
    # The bias added to every reconstruction: b_dec, plus the pre-bias added back after
    # decoding (so an SAE whose output bias lives in b_pre, e.g. one imported from SAELens,
    # reads the same as its b_dec twin).
    biases = [np.asarray(g.params[k], np.float64) for k in ("b_dec", "b_pre")
              if isinstance(g.params, Mapping) and k in g.params]
    m["b_dec_norm"] = (np.linalg.norm(sum(biases), axis=-1) if biases
                       else np.full((fired.shape[0],), np.nan))
    results.append(m)
  return clean_tot, results


GROUPS_PER_PART = 4  # held-out metrics: groups evaluated (and saved) together


def _evaluate_in_parts(groups: Sequence[_GroupInput], lm_params, data: eval_passes.HeldOut,
                       setup: grid_step.Setup, *, positions: str, window_tokens: int,
                       store: partial.Store | None
                       ) -> tuple[dict[str, float], list[dict[str, np.ndarray]]]:
  """`_evaluate` over the groups `GROUPS_PER_PART` at a time (the clean pass once per part:
  the same sums every time), each part saved to `store` as it finishes and read from it when
  found there. A group's metrics do not depend on the others in its part."""
  per_group = [store.load_metrics(i) if store else None for i in range(len(groups))]
  clean_sums = store.load_clean() if store else None
  todo = [i for i, m in enumerate(per_group) if m is None]
  if todo or clean_sums is None:
    if len(todo) < len(groups):
      logging.info("held-out metrics: %d of %d groups read from %s", len(groups) - len(todo),
                   len(groups), store.root)
    ref = reference(lm_params, data, setup)
    t0 = time.perf_counter()
    parts = [todo[j:j + GROUPS_PER_PART] for j in range(0, len(todo), GROUPS_PER_PART)] or [[]]
    for part in parts:
      clean_sums, results = _evaluate([groups[i] for i in part], lm_params, data, setup,
                                      positions=positions, window_tokens=window_tokens, ref=ref)
      for i, m in zip(part, results):
        per_group[i] = m
        if store:
          store.save_metrics(i, m)
      if store:
        store.save_clean(clean_sums)
      if part:
        logging.info("held-out metrics: groups %s done (%d of %d left, %.0f s)",
                     ", ".join(groups[i].spec.name for i in part),
                     sum(m is None for m in per_group), len(groups), time.perf_counter() - t0)
  return clean_sums, per_group


def evaluate_group(spec: sae_groups.GroupSpec, params, sae_state: sae_lib.SAEState | None,
                   hyper: grid_step.GroupHyper, lm_params, tokens_BT: jax.Array,
                   mask_BT: jax.Array, setup: grid_step.Setup, *,
                   next_BT: jax.Array | None = None, valid_BTV: jax.Array | None = None,
                   ref: eval_passes.Reference | None = None, splice_mode: str | None = None,
                   positions: str = "sentence", window_tokens: int = 0,
                   variant_loop: str | None = None) -> dict[str, jax.Array]:
  """Every metric of `eval_passes`' docstring for every variant of one group.

  Args:
    spec: the group.
    params, sae_state: its stacked SAE params / state (leading axis `spec.padded`); state None:
      fresh states (BatchTopK without a threshold).
    hyper: its `GroupHyper` (only `hparams` is used).
    lm_params: the frozen LM.
    tokens_BT: int `[B, T]` model inputs, or `[K, B, T]`: K batches evaluated in turn, the
      metrics exact means over all of them.
    mask_BT: bool, same shape: the tokens that count (see `eval_passes`).
    setup: the grid's setup (model, site, grammar).
    next_BT: the token after each position (default: the next input token, `<pad>` after
      the last position).
    valid_BTV: grammatical next tokens (default: `grammars.valid_next` of the tokens).
    ref: held-out means (default: computed from these batches, a first pass).
    splice_mode: `corrected` | `original`; default the group's `spec.splice_mode`.
    positions: `sentence` (the SAE replaces the activation at the mask's tokens) or `all`
      (at every position).
    window_tokens: firing counts over the first this-many masked tokens (0: all).
    variant_loop: `vmap` (one batched program) or `map` (variants one after another inside
      it: faster on CPU); default the grid's `setup.variant_loop`.

  Returns:
    name -> array with a leading axis `spec.padded` (drop padding with `spec.size`): the
    metrics of `eval_passes`' docstring, plus `firing_counts` `[N, F]`, `density_histogram`
    `[N, len(metrics.DENSITY_BIN_EDGES) - 1]` and `window_tokens`.
  """
  eval_passes.check_target(spec, setup)
  tokens = np.asarray(tokens_BT)
  mask = np.asarray(mask_BT)
  if tokens.ndim == 2:
    tokens, mask = tokens[None], mask[None]
    next_BT = None if next_BT is None else np.asarray(next_BT)[None]
    valid_BTV = None if valid_BTV is None else np.asarray(valid_BTV)[None]
  if tokens.ndim != 3 or mask.shape != tokens.shape or mask.dtype != bool:
    raise ValueError(f"tokens_BT must be int [B, T] or [K, B, T] and mask_BT bool of the same "
                     f"shape; got {tokens.shape} and {mask.dtype} {mask.shape}")
  if tokens.shape[-1] > setup.model_config.context:
    raise ValueError(f"sequences of {tokens.shape[-1]} positions exceed the LM's context "
                     f"{setup.model_config.context}")
  g = setup.grammar
  if next_BT is None:
    pad = np.full_like(tokens[..., :1], g.pad_id)
    next_BT = np.concatenate([tokens[..., 1:], pad], axis=-1)
  if valid_BTV is None:
    fn = generate_lib.jitted_for(g, grammars.valid_next)
    valid_BTV = np.stack([np.asarray(fn(t)) for t in tokens])
  data = eval_passes.HeldOut(tokens.astype(np.int32), np.asarray(next_BT, np.int32), mask,
                             np.asarray(valid_BTV, bool))
  if sae_state is None:
    sae_state = jax.vmap(lambda _: sae_lib.init_state(spec.sae))(jnp.arange(spec.padded))
  group = _GroupInput(spec, params, sae_state, hyper.hparams, splice_mode or spec.splice_mode,
                      variant_loop or _variant_loop(setup))
  _, (metrics,) = _evaluate([group], lm_params, data, setup, positions=positions,
                            window_tokens=window_tokens, ref=ref)
  return {k: jnp.asarray(v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------
# A whole trained grid, and the job.


def evaluate_trained(trained: trained_lib.TrainedGrid, *, seed: int = 0, num_batches: int = 10,
                     batch_size: int = 128, window_tokens: int = 0,
                     grammaticality_batches: int = 5, grammaticality_batch_size: int = 128,
                     splice_mode: str | None = None, positions: str = "sentence",
                     mask_positions: str | None = None,
                     grammaticality_modes: Sequence[str] = ("corrected", "original"),
                     grammaticality_positions: Sequence[str] = ("all", "sentence"),
                     store: partial.Store | None = None) -> dict[str, Any]:
  """Evaluates every variant of a trained grid; JSON-ready (NaN / inf as strings).

  With a `store`, every finished part (a few groups' held-out metrics, one group's generations
  for one combination) is saved as it completes and a part found there is read instead of
  recomputed: a stopped evaluation resumes where it stopped, with the same result.

  Args:
    trained: the grid (`trained.load(workdir)`).
    seed: the evaluation seed (held-out data and generations; `eval_passes` docstring).
    num_batches, batch_size: the held-out set.
    window_tokens: firing window for alive / dead / dense (0: every evaluated token).
    grammaticality_batches, grammaticality_batch_size: generations per variant (0 batches:
      skip spliced grammaticality).
    splice_mode: `corrected` | `original` for the held-out metrics (None: each group's).
    positions: where the SAE is spliced for the held-out metrics (`sentence` | `all`).
    mask_positions: which tokens count (`sentence` | `all`; None: the grid's training
      positions).
    grammaticality_modes, grammaticality_positions: the combinations generated.
    store: where finished parts are kept (`partial.Store`); None: nothing is kept.

  Returns:
    `{'language', 'site', 'target_site' (a transcoder grid's; '' for SAEs), 'steps', 'heldout': {...}, 'clean': {...clean-model numbers...},
    'density_bin_edges_log10': [...], 'variants': {variant_id: {'group', 'frozen',
    'bad_step', 'splice_mode', 'hparams', metric: float, ..., 'density_histogram': [...],
    'grammaticality/<mode>/<positions>': float, 'grammaticality_std/<mode>/<positions>':
    float}}}`.
  """
  setup = trained.setup
  # Every option is checked before anything is sampled or compiled.
  eval_passes.check_options(positions=positions, window_tokens=window_tokens,
                            splice_mode=splice_mode, mask_positions=mask_positions)
  spliced_generation.check_options(grammaticality_modes, grammaticality_positions)
  spliced_generation.check_positive_int("grammaticality_batches", grammaticality_batches, minimum=0)
  spliced_generation.check_positive_int("grammaticality_batch_size", grammaticality_batch_size)
  data = eval_passes.heldout(setup, seed, num_batches, batch_size, mask_positions=mask_positions)
  groups = [_GroupInput(spec, gs.params, gs.sae_state, hyper.hparams,
                        splice_mode or spec.splice_mode, _variant_loop(setup))
            for spec, gs, hyper in zip(setup.specs, trained.state.groups, trained.hypers)]
  lm_params = trained.lm.params
  t0 = time.perf_counter()
  clean_sums, per_group = _evaluate_in_parts(groups, lm_params, data, setup, positions=positions,
                                             window_tokens=window_tokens, store=store)
  t_metrics = time.perf_counter() - t0
  gram = None
  if grammaticality_batches:
    gram = spliced_generation.spliced_grammaticality(
        trained, seed=seed, num_batches=grammaticality_batches,
        batch_size=grammaticality_batch_size, modes=grammaticality_modes,
        positions=grammaticality_positions, store=store)
  t_gram = time.perf_counter() - t0 - t_metrics
  pred = clean_sums["predictions"]
  clean = {"ce_clean": clean_sums["ce_clean"] / pred,
           "ce_zero_ablation": clean_sums["ce_zero"] / pred,
           "ce_mean_ablation": clean_sums["ce_mean"] / pred,
           "grammatical_mass_clean": clean_sums["mass_clean"] / pred}
  clean = {k: jsonio.finite_or_str(v) for k, v in clean.items()}
  if gram is not None:
    clean["grammaticality"] = gram["clean"]["mean"]
    clean["grammaticality_std"] = gram["clean"]["std"]
    clean["grammaticality_per_batch"] = gram["clean"]["per_batch"]
    clean["grammaticality_finished"] = gram["clean"]["finished"]
  variants = {}
  skip = ("firing_counts", "density_histogram")
  for spec, gs, metrics in zip(setup.specs, trained.state.groups, per_group):
    frozen, bad = np.asarray(gs.frozen), np.asarray(gs.bad_step)
    for i, vid in enumerate(spec.ids):  # only the real variants: padding is dropped here
      v = {"group": spec.name, "frozen": bool(frozen[i]), "bad_step": int(bad[i]),
           "splice_mode": splice_mode or spec.splice_mode,
           "hparams": {k: sweep_lib.to_json(x) for k, x in spec.values[i].items()}}
      v.update({k: jsonio.finite_or_str(a[i]) for k, a in metrics.items() if k not in skip})
      v["density_histogram"] = [int(c) for c in metrics["density_histogram"][i]]
      if gram is not None:
        for combo, r in gram["variants"][vid].items():
          v[f"grammaticality/{combo}"] = r["mean"]
          v[f"grammaticality_std/{combo}"] = r["std"]
      variants[vid] = v
  return {
      "language": trained.lm.language, "site": setup.site,
      "target_site": grid_step.target_site(setup), "steps": int(trained.state.step),
      "heldout": {"seed": seed, "num_batches": num_batches, "batch_size": batch_size,
                  "mask_positions": mask_positions or setup.positions, "positions": positions,
                  "tokens": int(clean_sums["tokens"]), "predictions": int(pred),
                  "window_tokens": int(clean_sums["window"]), "forward_len": setup.forward_len,
                  "streams": f"held-out batch k: fold_in(fold_in(key({seed}), "
                             f"{eval_passes.HELDOUT_STREAM}), k); "
                             f"generations: fold_in(key({seed}), "
                             f"{spliced_generation.GENERATION_STREAM})"},
      "grammaticality_settings": None if gram is None else gram["settings"],
      "clean": clean,
      "density_bin_edges_log10": [float(e) for e in metrics_lib.DENSITY_BIN_EDGES],
      "seconds": {"metrics": t_metrics, "grammaticality": t_gram},
      "variants": variants,
  }


def validate_config(config) -> None:
  """Checks an `eval` config before anything is loaded or compiled."""
  if not config.sae_workdir:
    raise ValueError("config.sae_workdir is required: the workdir of a finished sae job "
                     "(e.g. experiments/configs/eval.py:sae_workdir=workdirs/sae_e2e_dyck2)")
  for name in ("num_batches", "batch_size", "grammaticality_batch_size"):
    spliced_generation.check_positive_int(f"config.{name}", config[name])
  for name in ("window_tokens", "grammaticality_batches", "seed"):
    spliced_generation.check_positive_int(f"config.{name}", config[name], minimum=0)
  if config.splice_mode and config.splice_mode not in sae_lib.SPLICE_MODES:
    raise ValueError(f"config.splice_mode={config.splice_mode!r}: use '' (each group's), "
                     f"{' or '.join(map(repr, sae_lib.SPLICE_MODES))}")
  if config.positions not in eval_passes.POSITIONS:
    raise ValueError(f"config.positions={config.positions!r}: use 'sentence' or 'all'")
  if config.mask_positions and config.mask_positions not in eval_passes.POSITIONS:
    raise ValueError(f"config.mask_positions={config.mask_positions!r}: use '' (the grid's), "
                     "'sentence' or 'all'")
  for name, allowed in (("grammaticality_modes", sae_lib.SPLICE_MODES),
                        ("grammaticality_positions", spliced_generation.POSITIONS)):
    bad = [v for v in config[name] if v not in allowed]
    if bad or not config[name]:
      raise ValueError(f"config.{name}={tuple(config[name])!r}: choose among {allowed}")


def run(config, workdir: str) -> dict[str, Any]:
  """The `eval` job: evaluates the grid in `config.sae_workdir`, writes `eval.json` in `workdir`.

  Returns the eval dict. The `eval` job of `experiments.main` is `jaxsae.eval_job.run`: this,
  then the report.

  Raises:
    workdir.LockedError: another job is writing to `workdir`.
    workdir.InputMismatchError: `workdir` holds the evaluation of another grid (or checkpoint).
  """
  validate_config(config)
  return run_validated(config, workdir)


def run_validated(config, workdir: str) -> dict[str, Any]:
  """`run` of a config that `validate_config` has passed (the pipeline validates every stage
  up front, once)."""
  if not os.path.isdir(config.sae_workdir):
    raise FileNotFoundError(f"config.sae_workdir={config.sae_workdir!r} does not exist; train "
                            "the grid first (experiments/configs/sae_*.py)")
  with workdir_lib.lock(workdir):
    return _run_locked(config, workdir)


def _part_settings(config) -> tuple[dict[str, Any], dict[str, Any]]:
  """The settings the held-out metrics and the generations depend on (`partial.Store`)."""
  metrics = {k: config[k] for k in ("seed", "num_batches", "batch_size", "window_tokens",
                                    "splice_mode", "positions", "mask_positions")}
  generations = {"seed": config.seed, "batches": config.grammaticality_batches,
                 "batch_size": config.grammaticality_batch_size}
  return metrics, generations


def _run_locked(config, workdir: str) -> dict[str, Any]:
  trained = trained_lib.load(config.sae_workdir)
  identity = workdir_lib.check_grid(workdir, trained.identity, "eval")
  store = partial.Store(workdir, trained.identity, *_part_settings(config))
  result = evaluate_trained(
      trained, seed=config.seed, num_batches=config.num_batches, batch_size=config.batch_size,
      window_tokens=config.window_tokens, grammaticality_batches=config.grammaticality_batches,
      grammaticality_batch_size=config.grammaticality_batch_size,
      splice_mode=config.splice_mode or None, positions=config.positions,
      mask_positions=config.mask_positions or None,
      grammaticality_modes=tuple(config.grammaticality_modes),
      grammaticality_positions=tuple(config.grammaticality_positions), store=store)
  result["sae_workdir"] = os.path.abspath(config.sae_workdir)
  workdir_lib.record_input(workdir, "grid", identity)
  path = os.path.join(workdir, "eval.json")
  jsonio.write(path, result)
  store.clear()
  for vid, v in sorted(result["variants"].items()):
    logging.info("%s (%s)%s: L0 %s, CE +%s, KL %s, EV %s, recovered(zero) %s", vid, v["group"],
                 " FROZEN" if v["frozen"] else "", v["l0"], v["ce_increase"], v["kl"],
                 v["ev_token_mean"], v["ce_recovered_zero"])
  logging.info("Wrote %s (%d variants; metrics %.1f s, grammaticality %.1f s).", path,
               len(result["variants"]), result["seconds"]["metrics"],
               result["seconds"]["grammaticality"])
  return result

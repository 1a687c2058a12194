"""Evaluation of an SAE grid: every metric of specs/sae.md for all variants of a group at once.

The `eval` job (`run(config, workdir)`) reads a finished `sae` workdir (`train_sae.load_trained`),
evaluates every variant on a held-out data stream and writes `eval.json`. This module holds the
held-out data, the compiled passes over it (`evaluate_group`), the whole-grid evaluation
(`evaluate_trained`) and the job. The per-token formulas are in `metrics.py`, spliced
grammaticality (generation with the SAE spliced in) in `spliced_generation.py`, feature recovery
in `analysis.py` and dictionary geometry in `geometry.py`.

Data. Held-out batch k is `grammars.sample(fold_in(fold_in(key(seed), 1000), k), ...)` and the
generations of `spliced_generation.spliced_grammaticality` use `fold_in(key(seed), 1001)` (batch
i: its `fold_in(., i)`). SAE training uses the branches 1 (data), 2 (capacity probe) and 3 (pre-bias
sample) of its own root key, the LM job 0-4 of the LM's root: the streams never share a key.
Sequences are sampled at the grid's `max_len`; the model sees the first `forward_len`
positions, as in training.

Which tokens count. `mask_BT` (sentence tokens, or every non-pad position: the grid's
`positions` unless told otherwise) selects the tokens of every activation metric. Output
metrics (CE, KL, top-1, TV, grammatical mass) count the *predictions* of those positions:
position t (logits predicting token t+1) counts iff `mask_BT[t]` and token t+1 is not `<pad>`
(train_lm's rule: pad targets are ignored). With sentence tokens that is every sentence
position, predicting the next sentence token or `<eos>`; with all positions, the decorator
positions predicting the decorator and the first word, then the sentence.

Where the SAE goes. `positions='sentence'` splices the SAE (and the zero / mean ablations)
at the `mask_BT` tokens only, the clean activation elsewhere (what SAE training does);
`positions='all'` splices at every position, decorator and padding included (padding cannot
affect earlier positions). The splice mode is the group's `splice_mode` unless overridden.

Metrics per variant (all exact token means over the whole held-out set: per-batch sums, added
in float64 on the host, divided at the end). x = clean activation at the site, x̂ = the spliced
activation (in the model's space, i.e. after the splice mode's rescaling), mu = mean of x
over the held-out `mask_BT` tokens (a first pass computes it), LN = layer norm without affine
and eps 1e-5 (e2e_sae's `_layer_norm_pre`; the formulas are `metrics.py`'s):

    l0                mean over tokens of #(latents != 0); frac_zeros = 1 - l0 / F
    alive, dead       latents firing at least once / never in the first `window_tokens` masked
                      tokens (0: all of them); dense: firing on > 10% of them; *_fraction of F;
                      density_histogram: alive latents per log10(firing frequency) bin
                      (`metrics.DENSITY_BIN_EDGES`; below -6 goes to the first bin)
    mse               mean over tokens × dims of (x̂ - x)²  (mse_sae_space: x_hat vs the SAE's
                      own target, what the training loss saw; differs only under input/recon
                      norm)
    nmse              Σ‖x̂ - x‖² / Σ‖x‖²   (relative to the zero reconstruction)
    ev_token_mean     mean over tokens of 1 - Σ_d (x̂-x)² / Σ_d (x-mu)²   (e2e_sae's form)
    ev_ratio_of_sums  1 - Σ_tokens Σ_d (x̂-x)² / Σ_tokens Σ_d (x-mu)²   (1 - FVU)
    ev_layernorm      the token-mean form on LN(x̂), LN(x), with mu = mean of LN(x) (e2e_sae's
                      `layer_norm=True`)
    ce_clean, ce_spliced, ce_increase = ce_spliced - ce_clean  (next-token CE, nats)
    kl                mean over predictions of KL(p_clean ‖ p_spliced)
    top1_agreement    fraction of predictions with argmax p_clean = argmax p_spliced
    total_variation   mean over predictions of ½ Σ_v |p_clean - p_spliced|
    ce_zero_ablation, ce_mean_ablation  CE with the site replaced by 0 / by mu (same positions)
    ce_recovered_zero, ce_recovered_mean = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)
    ds_mse/<site>, ds_ev/<site>  mse and token-mean EV of the spliced vs clean activation at
                      every later resid_post (mu: its held-out mean)
    grammatical_mass_clean / _spliced  mean over predictions of the probability mass on the
                      grammatical next tokens (`grammars.valid_next`)

Compilation: the clean forward runs once per batch and is shared by every variant of every
group; each group's metrics come from one jitted function of the stacked SAE params (static:
the SAE config, splice mode and positions), so a group compiles once whatever its size. Inside
it the variants are vmapped, or run one after another with `lax.map` where the grid's
`variant_loop` says so (its 'auto' picks the map on CPU, where it is faster; see
`grid_step.over_variants`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import generate as generate_lib
from jaxsae import grammars
from jaxsae import grid_step
from jaxsae import jsonio
from jaxsae import losses as losses_lib
from jaxsae import metrics as metrics_lib
from jaxsae import model as model_lib
from jaxsae import report as report_lib
from jaxsae import sae as sae_lib
from jaxsae import sae_groups
from jaxsae import spliced_generation
from jaxsae import sweep as sweep_lib
from jaxsae import train_sae

_HELDOUT_STREAM = 1000  # held-out batch k: fold_in(fold_in(key(seed), 1000), k)
POSITIONS = ("sentence", "all")  # where the SAE is spliced for the held-out metrics
_ALL_WINDOW = 2**30  # window_tokens=0: every evaluated token


# ------------------------------------------------------------------------------------------------
# Held-out data.


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Held-out batches (host arrays; K batches of B sequences, T = the grid's forward_len).

  Attributes:
    tokens_KBT: int32 model inputs.
    next_KBT: int32 the token after each position (`<pad>` beyond the sampled sequence).
    mask_KBT: bool, the tokens that count (sentence tokens or non-pad positions).
    valid_KBTV: bool, grammatical next tokens of each prefix (`grammars.valid_next`).
  """

  tokens_KBT: np.ndarray
  next_KBT: np.ndarray
  mask_KBT: np.ndarray
  valid_KBTV: np.ndarray

  @property
  def num_batches(self) -> int:
    return self.tokens_KBT.shape[0]


def _check_options(*, positions: str = "sentence", window_tokens: int = 0,
                   splice_mode: str | None = None, mask_positions: str | None = None) -> None:
  if positions not in POSITIONS:
    raise ValueError(f"positions={positions!r}: use 'sentence' (SAE at the mask's tokens) or "
                     "'all' (at every position)")
  spliced_generation.check_positive_int("window_tokens", window_tokens, minimum=0)
  if splice_mode is not None and splice_mode not in sae_lib.SPLICE_MODES:
    raise ValueError(f"splice_mode={splice_mode!r}: use one of {sae_lib.SPLICE_MODES} (or "
                     "None for each group's own)")
  if mask_positions is not None and mask_positions not in POSITIONS:
    raise ValueError(f"mask_positions={mask_positions!r}: use 'sentence', 'all' or None (the "
                     "grid's training positions)")


def heldout(setup: grid_step.Setup, seed: int, num_batches: int, batch_size: int, *,
            mask_positions: str | None = None) -> HeldOut:
  """Samples the held-out set: batch k from `fold_in(fold_in(key(seed), 1000), k)`.

  Args:
    setup: the grid's setup (grammar, max_len, forward_len, positions).
    seed: the evaluation seed.
    num_batches, batch_size: K and B.
    mask_positions: `sentence` or `all` (non-pad); default the grid's `positions`.
  """
  spliced_generation.check_positive_int("num_batches", num_batches)
  spliced_generation.check_positive_int("batch_size", batch_size)
  mask_positions = mask_positions or setup.positions
  if mask_positions not in POSITIONS:
    raise ValueError(f"mask_positions={mask_positions!r}: use 'sentence' or 'all'.")
  g = setup.grammar
  t = setup.forward_len
  key = jax.random.fold_in(jax.random.key(seed), _HELDOUT_STREAM)
  valid_fn = generate_lib.jitted_for(g, grammars.valid_next)
  out = {"tokens": [], "next": [], "mask": [], "valid": []}
  for k in range(num_batches):
    batch = grammars.sample(jax.random.fold_in(key, k), g, batch_size, setup.max_len)
    full = np.asarray(batch.tokens)
    padded = np.concatenate([full, np.full_like(full[:, :1], g.pad_id)], axis=1)
    tokens = full[:, :t]
    out["tokens"].append(tokens)
    out["next"].append(padded[:, 1:t + 1])
    out["mask"].append(np.asarray(batch.sentence_mask)[:, :t] if mask_positions == "sentence"
                       else tokens != g.pad_id)
    out["valid"].append(np.asarray(valid_fn(full))[:, :t])
  return HeldOut(*(np.stack(out[k]) for k in ("tokens", "next", "mask", "valid")))


# ------------------------------------------------------------------------------------------------
# The compiled passes.


@dataclasses.dataclass(frozen=True)
class _Static:
  """What shapes the clean pass (hashable: a jit static argument)."""

  model_config: model_lib.ModelConfig
  site: str
  ds_sites: tuple[str, ...]
  pad_id: int
  splice_all: bool  # positions == 'all'


@dataclasses.dataclass(frozen=True)
class _GroupStatic:
  """What shapes one group's pass."""

  base: _Static
  sae: sae_lib.SAEConfig
  splice_mode: str
  variant_loop: str  # 'vmap' or 'map' (`grid_step.over_variants`)


@flax.struct.dataclass
class Reference:
  """Held-out token means (over `mask_BT` tokens) of the clean activations.

  Attributes:
    mean_D: mu at the SAE site (EV's centre, the mean-ablation value).
    ln_mean_D: mean of layer_norm(x) at the site (ev_layernorm's centre).
    ds_mean: downstream site -> its mean (ds_ev's centre).
  """

  mean_D: jax.Array
  ln_mean_D: jax.Array
  ds_mean: dict[str, jax.Array]


@flax.struct.dataclass
class _Clean:
  """One batch's clean forward and masks, shared by every variant of every group."""

  acts_BTD: jax.Array
  logits_BTV: jax.Array
  ds_acts: dict[str, jax.Array]
  mask_BT: jax.Array
  predict_BT: jax.Array
  window_BT: jax.Array
  next_BT: jax.Array
  valid_BTV: jax.Array


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values, 0.0))


@functools.partial(jax.jit, static_argnames=("st",))
def _reference_sums(lm_params, tokens_BT, mask_BT, *, st: _Static):
  last = st.ds_sites[-1] if st.ds_sites else st.site
  res = model_lib.apply(lm_params, tokens_BT, st.model_config, collect=(st.site, *st.ds_sites),
                        stop_at=last)
  w = mask_BT.astype(jnp.float32)[..., None]
  total = lambda a: jnp.sum(w * a, axis=(0, 1))
  x = res.acts[st.site]
  return {"x": total(x), "ln": total(metrics_lib.layer_norm(x)),
          **{f"ds/{h}": total(res.acts[h]) for h in st.ds_sites}}


@functools.partial(jax.jit, static_argnames=("st",))
def _clean_pass(lm_params, tokens_BT, next_BT, mask_BT, valid_BTV, ref: Reference, window_left,
                *, st: _Static):
  """The clean forward, the ablation baselines and the clean sums of one batch."""
  mc = st.model_config
  clean = model_lib.apply(lm_params, tokens_BT, mc, collect=(st.site, *st.ds_sites))
  x = clean.acts[st.site]
  predict = mask_BT & (next_BT != st.pad_id)
  flat = mask_BT.reshape(-1)
  rank = jnp.cumsum(flat.astype(jnp.int32)).reshape(mask_BT.shape)
  window = mask_BT & (rank <= window_left)
  splice_at = jnp.ones_like(mask_BT) if st.splice_all else mask_BT

  def ablated_ce(value_BTD):
    out = jnp.where(splice_at[..., None], value_BTD, x)
    logits = model_lib.apply_from(lm_params, st.site, out, mc).logits
    return _masked_sum(metrics_lib.token_cross_entropy(logits, next_BT), predict)

  w = mask_BT.astype(jnp.float32)
  sums = {
      "tokens": jnp.sum(w),
      "predictions": jnp.sum(predict.astype(jnp.float32)),
      "window": jnp.sum(window.astype(jnp.float32)),
      "var": jnp.sum(w * jnp.sum(jnp.square(x - ref.mean_D[None, None, :]), axis=-1)),
      "sq_x": jnp.sum(w * jnp.sum(jnp.square(x), axis=-1)),
      "ce_clean": _masked_sum(metrics_lib.token_cross_entropy(clean.logits, next_BT), predict),
      "mass_clean": _masked_sum(metrics_lib.token_grammatical_mass(clean.logits, valid_BTV),
                                predict),
      "ce_zero": ablated_ce(jnp.zeros_like(x)),
      "ce_mean": ablated_ce(jnp.broadcast_to(ref.mean_D[None, None, :], x.shape)),
  }
  c = _Clean(acts_BTD=x, logits_BTV=clean.logits, ds_acts={h: clean.acts[h] for h in st.ds_sites},
             mask_BT=mask_BT, predict_BT=predict, window_BT=window, next_BT=next_BT,
             valid_BTV=valid_BTV)
  return c, sums


@functools.partial(jax.jit, static_argnames=("st",))
def _group_pass(sae_params, sae_state, hparams, lm_params, c: _Clean, ref: Reference, *,
                st: _GroupStatic):
  """Per-variant sums of one batch for a whole group (over the leading axis N: vmapped, or
  `lax.map` where the grid's `variant_loop` says so, as in training)."""
  b = st.base
  x = c.acts_BTD
  w = c.mask_BT.astype(jnp.float32)

  def one(params, state, hp):
    out, codes, aux = sae_lib.splice(params, x, st.sae, hp, st.splice_mode,
                                     mask=None if b.splice_all else c.mask_BT, state=state)
    nonzero = codes != 0
    res = model_lib.apply_from(lm_params, b.site, out, b.model_config, collect=b.ds_sites)
    logits = res.logits
    sums = {
        "l0": jnp.sum(w * jnp.sum(nonzero, axis=-1)),
        "sq_err": jnp.sum(w * metrics_lib.token_sq_error(out, x)),
        "sq_err_sae": jnp.sum(w * metrics_lib.token_sq_error(aux["x_hat"], aux["target"])),
        "ev_tok": jnp.sum(w * metrics_lib.token_explained_variance(out, x, ref.mean_D)),
        "ev_ln_tok": jnp.sum(w * metrics_lib.token_explained_variance(
            metrics_lib.layer_norm(out), metrics_lib.layer_norm(x),
                                                          ref.ln_mean_D)),
        "ce": _masked_sum(metrics_lib.token_cross_entropy(logits, c.next_BT), c.predict_BT),
        "kl": _masked_sum(metrics_lib.token_kl(c.logits_BTV, logits), c.predict_BT),
        "tv": _masked_sum(metrics_lib.token_total_variation(c.logits_BTV, logits), c.predict_BT),
        "top1": _masked_sum(metrics_lib.token_top1_agreement(c.logits_BTV, logits),
                            c.predict_BT),
        "mass": _masked_sum(metrics_lib.token_grammatical_mass(logits, c.valid_BTV),
                            c.predict_BT),
    }
    for h in b.ds_sites:
      sums[f"ds_sq_err/{h}"] = jnp.sum(
          w * metrics_lib.token_sq_error(res.acts[h], c.ds_acts[h]))
      sums[f"ds_ev_tok/{h}"] = jnp.sum(
          w * metrics_lib.token_explained_variance(res.acts[h], c.ds_acts[h], ref.ds_mean[h]))
    fired = jnp.sum(nonzero & c.window_BT[..., None], axis=(0, 1), dtype=jnp.int32)
    return sums, fired

  return grid_step.over_variants(one, st.variant_loop)(sae_params, sae_state, hparams)


def _finalize(clean: Mapping[str, float], sums: Mapping[str, np.ndarray], fired: np.ndarray,
              st: _GroupStatic) -> dict[str, np.ndarray]:
  """Ratios of the accumulated sums (float64), per variant `[N]`."""
  n = fired.shape[0]
  width, d = st.sae.width, st.base.model_config.d_model
  tok, pred, win = clean["tokens"], clean["predictions"], clean["window"]
  full = lambda v: np.full((n,), v, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    m = {
        "l0": sums["l0"] / tok,
        "frac_zeros": 1.0 - sums["l0"] / (tok * width),
        "mse": sums["sq_err"] / (tok * d),
        "mse_sae_space": sums["sq_err_sae"] / (tok * d),
        "nmse": sums["sq_err"] / clean["sq_x"],
        "ev_token_mean": sums["ev_tok"] / tok,
        "ev_ratio_of_sums": 1.0 - sums["sq_err"] / clean["var"],
        "ev_layernorm": sums["ev_ln_tok"] / tok,
        "ce_clean": full(clean["ce_clean"] / pred),
        "ce_spliced": sums["ce"] / pred,
        "kl": sums["kl"] / pred,
        "top1_agreement": sums["top1"] / pred,
        "total_variation": sums["tv"] / pred,
        "ce_zero_ablation": full(clean["ce_zero"] / pred),
        "ce_mean_ablation": full(clean["ce_mean"] / pred),
        "grammatical_mass_clean": full(clean["mass_clean"] / pred),
        "grammatical_mass_spliced": sums["mass"] / pred,
    }
    m["ce_increase"] = m["ce_spliced"] - m["ce_clean"]
    m["ce_recovered_zero"] = metrics_lib.ce_recovered(m["ce_zero_ablation"], m["ce_spliced"],
                                                      m["ce_clean"])
    m["ce_recovered_mean"] = metrics_lib.ce_recovered(m["ce_mean_ablation"], m["ce_spliced"],
                                                      m["ce_clean"])
    for h in st.base.ds_sites:
      m[f"ds_mse/{h}"] = sums[f"ds_sq_err/{h}"] / (tok * d)
      m[f"ds_ev/{h}"] = sums[f"ds_ev_tok/{h}"] / tok
  m.update(metrics_lib.latent_counts(fired, int(win)))
  m["density_histogram"] = metrics_lib.density_histogram(fired, int(win))
  m["firing_counts"] = fired
  m["window_tokens"] = full(win)
  return m


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


def _static_for(setup: grid_step.Setup, positions: str) -> _Static:
  mc = setup.model_config
  return _Static(model_config=mc, site=setup.site,
                 ds_sites=losses_lib.downstream_sites(mc, setup.site, include_final=True),
                 pad_id=setup.grammar.pad_id, splice_all=positions == "all")


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


def reference(lm_params, data: HeldOut, setup: grid_step.Setup) -> Reference:
  """The first pass: held-out means of the clean activations over the masked tokens."""
  st = _static_for(setup, "sentence")
  totals: dict[str, np.ndarray] = {}
  count = 0
  for k in range(data.num_batches):
    s = jax.device_get(_reference_sums(lm_params, data.tokens_KBT[k], data.mask_KBT[k], st=st))
    for name, v in s.items():
      totals[name] = totals.get(name, 0.0) + np.asarray(v, np.float64)
    count += int(data.mask_KBT[k].sum())
  if count == 0:
    raise ValueError("the held-out set selects no tokens (empty mask); use more / larger "
                     "batches or mask_positions='all'")
  mean = lambda v: jnp.asarray(v / count, jnp.float32)
  return Reference(mean_D=mean(totals["x"]), ln_mean_D=mean(totals["ln"]),
                   ds_mean={h: mean(totals[f"ds/{h}"]) for h in st.ds_sites})


def _evaluate(groups: Sequence[_GroupInput], lm_params, data: HeldOut, setup: grid_step.Setup,
              *, positions: str, window_tokens: int, ref: Reference | None = None
              ) -> tuple[dict[str, float], list[dict[str, np.ndarray]]]:
  """Both passes for several groups; returns (clean sums, per-group finalized metrics)."""
  _check_options(positions=positions, window_tokens=window_tokens)
  for g in groups:
    _check_group_input(g)
  st = _static_for(setup, positions)
  ref = reference(lm_params, data, setup) if ref is None else ref
  window = window_tokens or _ALL_WINDOW
  clean_tot: dict[str, float] = {}
  group_tot: list[dict[str, np.ndarray]] = [{} for _ in groups]
  fired_tot: list[np.ndarray | None] = [None for _ in groups]
  seen = 0
  for k in range(data.num_batches):
    left = jnp.int32(max(window - seen, 0))
    c, csums = _clean_pass(lm_params, data.tokens_KBT[k], data.next_KBT[k], data.mask_KBT[k],
                           data.valid_KBTV[k], ref, left, st=st)
    outs = []
    for g in groups:
      gst = _GroupStatic(base=st, sae=g.spec.sae, splice_mode=g.splice_mode,
                         variant_loop=g.variant_loop)
      outs.append(_group_pass(g.params, g.sae_state, g.hparams, lm_params, c, ref, st=gst))
    csums, outs = jax.device_get((csums, outs))
    for name, v in csums.items():
      clean_tot[name] = clean_tot.get(name, 0.0) + float(v)
    for i, (sums, fired) in enumerate(outs):
      for name, v in sums.items():
        group_tot[i][name] = group_tot[i].get(name, 0.0) + np.asarray(v, np.float64)
      fired = np.asarray(fired, np.int64)
      fired_tot[i] = fired if fired_tot[i] is None else fired_tot[i] + fired
    seen += int(data.mask_KBT[k].sum())
  results = []
  for g, sums, fired in zip(groups, group_tot, fired_tot):
    gst = _GroupStatic(base=st, sae=g.spec.sae, splice_mode=g.splice_mode,
                       variant_loop=g.variant_loop)
    results.append(_finalize(clean_tot, sums, fired, gst))
  return clean_tot, results


def evaluate_group(spec: sae_groups.GroupSpec, params, sae_state: sae_lib.SAEState | None,
                   hyper: grid_step.GroupHyper, lm_params, tokens_BT: jax.Array,
                   mask_BT: jax.Array, setup: grid_step.Setup, *,
                   next_BT: jax.Array | None = None, valid_BTV: jax.Array | None = None,
                   ref: Reference | None = None, splice_mode: str | None = None,
                   positions: str = "sentence", window_tokens: int = 0,
                   variant_loop: str | None = None) -> dict[str, jax.Array]:
  """Every metric of the module docstring for every variant of one group.

  Args:
    spec: the group.
    params, sae_state: its stacked SAE params / state (leading axis `spec.padded`); state None:
      fresh states (BatchTopK without a threshold).
    hyper: its `GroupHyper` (only `hparams` is used).
    lm_params: the frozen LM.
    tokens_BT: int `[B, T]` model inputs, or `[K, B, T]`: K batches evaluated in turn, the
      metrics exact means over all of them.
    mask_BT: bool, same shape: the tokens that count (see the module docstring).
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
    metrics of the module docstring, plus `firing_counts` `[N, F]`, `density_histogram`
    `[N, len(metrics.DENSITY_BIN_EDGES) - 1]` and `window_tokens`.
  """
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
  data = HeldOut(tokens.astype(np.int32), np.asarray(next_BT, np.int32), mask,
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


def evaluate_trained(trained: train_sae.Trained, *, seed: int = 0, num_batches: int = 10,
                     batch_size: int = 128, window_tokens: int = 0,
                     grammaticality_batches: int = 5, grammaticality_batch_size: int = 128,
                     splice_mode: str | None = None, positions: str = "sentence",
                     mask_positions: str | None = None,
                     grammaticality_modes: Sequence[str] = ("corrected", "original"),
                     grammaticality_positions: Sequence[str] = ("all", "sentence")
                     ) -> dict[str, Any]:
  """Evaluates every variant of a trained grid; JSON-ready (NaN / inf as strings).

  Args:
    trained: from `train_sae.load_trained`.
    seed: the evaluation seed (held-out data and generations; module docstring).
    num_batches, batch_size: the held-out set.
    window_tokens: firing window for alive / dead / dense (0: every evaluated token).
    grammaticality_batches, grammaticality_batch_size: generations per variant (0 batches:
      skip spliced grammaticality).
    splice_mode: `corrected` | `original` for the held-out metrics (None: each group's).
    positions: where the SAE is spliced for the held-out metrics (`sentence` | `all`).
    mask_positions: which tokens count (`sentence` | `all`; None: the grid's training
      positions).
    grammaticality_modes, grammaticality_positions: the combinations generated.

  Returns:
    `{'language', 'site', 'steps', 'heldout': {...}, 'clean': {...clean-model numbers...},
    'density_bin_edges_log10': [...], 'variants': {variant_id: {'group', 'frozen',
    'bad_step', 'splice_mode', 'hparams', metric: float, ..., 'density_histogram': [...],
    'grammaticality/<mode>/<positions>': float, 'grammaticality_std/<mode>/<positions>':
    float}}}`.
  """
  setup = trained.setup
  # Every option is checked before anything is sampled or compiled.
  _check_options(positions=positions, window_tokens=window_tokens, splice_mode=splice_mode,
                 mask_positions=mask_positions)
  spliced_generation.check_options(grammaticality_modes, grammaticality_positions)
  spliced_generation.check_positive_int("grammaticality_batches", grammaticality_batches, minimum=0)
  spliced_generation.check_positive_int("grammaticality_batch_size", grammaticality_batch_size)
  data = heldout(setup, seed, num_batches, batch_size, mask_positions=mask_positions)
  groups = [_GroupInput(spec, gs.params, gs.sae_state, hyper.hparams,
                        splice_mode or spec.splice_mode, _variant_loop(setup))
            for spec, gs, hyper in zip(setup.specs, trained.state.groups, trained.hypers)]
  lm_params = trained.lm.params
  t0 = time.perf_counter()
  clean_sums, per_group = _evaluate(groups, lm_params, data, setup, positions=positions,
                                    window_tokens=window_tokens)
  t_metrics = time.perf_counter() - t0
  gram = None
  if grammaticality_batches:
    gram = spliced_generation.spliced_grammaticality(
        trained, seed=seed, num_batches=grammaticality_batches,
        batch_size=grammaticality_batch_size, modes=grammaticality_modes,
        positions=grammaticality_positions)
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
      "language": trained.lm.language, "site": setup.site, "steps": int(trained.state.step),
      "heldout": {"seed": seed, "num_batches": num_batches, "batch_size": batch_size,
                  "mask_positions": mask_positions or setup.positions, "positions": positions,
                  "tokens": int(clean_sums["tokens"]), "predictions": int(pred),
                  "window_tokens": int(clean_sums["window"]), "forward_len": setup.forward_len,
                  "streams": f"held-out batch k: fold_in(fold_in(key({seed}), "
                             f"{_HELDOUT_STREAM}), k); generations: fold_in(key({seed}), "
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
  if config.positions not in POSITIONS:
    raise ValueError(f"config.positions={config.positions!r}: use 'sentence' or 'all'")
  if config.mask_positions and config.mask_positions not in POSITIONS:
    raise ValueError(f"config.mask_positions={config.mask_positions!r}: use '' (the grid's), "
                     "'sentence' or 'all'")
  for name, allowed in (("grammaticality_modes", sae_lib.SPLICE_MODES),
                        ("grammaticality_positions", spliced_generation.POSITIONS)):
    bad = [v for v in config[name] if v not in allowed]
    if bad or not config[name]:
      raise ValueError(f"config.{name}={tuple(config[name])!r}: choose among {allowed}")


def write_report(sae_workdir: str, workdir: str, result: dict[str, Any]) -> dict[str, str]:
  """report.md / report.json / plots in `workdir` from the eval result and the grid's training
  summary (feature recovery and causal predictability come with the `pipeline` job)."""
  summary = jsonio.read(os.path.join(sae_workdir, "summary.json"))
  if summary is None:
    logging.warning("No summary.json in %s: report skipped.", sae_workdir)
    return {}
  lm_dir = jsonio.read(os.path.join(sae_workdir, "config.json")) or {}
  lm = jsonio.read(os.path.join(lm_dir.get("lm_workdir", ""), "summary.json"))
  paths = report_lib.write_report(workdir, summary=summary, eval_results=result, lm=lm)
  logging.info("Wrote %s.", os.path.join(workdir, "report.md"))
  return paths


def run(config, workdir: str) -> dict[str, Any]:
  """The `eval` job: evaluates the grid in `config.sae_workdir`, writes `eval.json` in `workdir`.

  Returns the eval dict (the hook for the report job, which reads it or `eval.json`).
  """
  validate_config(config)
  if not os.path.isdir(config.sae_workdir):
    raise FileNotFoundError(f"config.sae_workdir={config.sae_workdir!r} does not exist; train "
                            "the grid first (experiments/configs/sae_*.py)")
  trained = train_sae.load_trained(config.sae_workdir)
  result = evaluate_trained(
      trained, seed=config.seed, num_batches=config.num_batches, batch_size=config.batch_size,
      window_tokens=config.window_tokens, grammaticality_batches=config.grammaticality_batches,
      grammaticality_batch_size=config.grammaticality_batch_size,
      splice_mode=config.splice_mode or None, positions=config.positions,
      mask_positions=config.mask_positions or None,
      grammaticality_modes=tuple(config.grammaticality_modes),
      grammaticality_positions=tuple(config.grammaticality_positions))
  result["sae_workdir"] = os.path.abspath(config.sae_workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "eval.json")
  jsonio.write(path, result)
  for vid, v in sorted(result["variants"].items()):
    logging.info("%s (%s)%s: L0 %s, CE +%s, KL %s, EV %s, recovered(zero) %s", vid, v["group"],
                 " FROZEN" if v["frozen"] else "", v["l0"], v["ce_increase"], v["kl"],
                 v["ev_token_mean"], v["ce_recovered_zero"])
  logging.info("Wrote %s (%d variants; metrics %.1f s, grammaticality %.1f s).", path,
               len(result["variants"]), result["seconds"]["metrics"],
               result["seconds"]["grammaticality"])
  write_report(config.sae_workdir, workdir, result)
  return result

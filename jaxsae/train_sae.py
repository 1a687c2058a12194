"""SAE grid training: every variant of a sweep trained in one compiled program.

Per step, one batch is drawn on device from (seed, step) and the frozen LM runs ONCE up to the
SAE site (to the logits, with the downstream sites collected, only if some group needs them).
Variants are grouped by static structure (`sweep`); each group's variants are stacked on a
leading axis N and updated by one function written for one variant, applied with `jax.vmap`
(accelerators) or `lax.map` (CPU, where XLA's batched matrix multiplies are slow; see
`over_variants`):

- local groups train on the activations of the selected tokens, gathered into a fixed-capacity
  buffer (sentence tokens are ~6-40% of positions, so padding costs nothing), and never run the
  downstream model;
- e2e / e2e+ds groups splice each variant's SAE at the site (on the selected tokens), run the
  frozen rest of the model from there (`model.apply_from`, vmapped over variants) and compare
  with the clean logits computed once; gradients reach SAE params only;
- groups with the causal-interpolation term (`causal=True`, any preset) also splice, at every
  selected token, the decoded interpolation towards its nearest latent-space neighbour in the
  same sequence and match the interpolated target logits (`_causal_term`), with β per variant
  (constant or ramped), an optional plain pre-training phase and a fresh optimizer at a lower
  lr for the fine-tuning phase.

Each variant has its own Adam state, learning rate (× a shared schedule: constant, or linear
warm-up + cosine to a floor) and global-norm clip. A variant whose loss or gradients turn
non-finite is frozen at its last good parameters and flagged (with its hyperparameters) in the
logs and `summary.json`; the others are untouched. `log_every` steps run inside one `lax.scan`
per host call with the state donated; metrics are fetched once per call. Checkpoints hold the
whole grid state; data is a pure function of (seed, step), so resume is exact.

Devices: a mesh with axes ('variant', 'data'); each group's variant axis is padded to a multiple
of the variant-axis size and sharded over it, the batch over 'data'.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsae import checkpoint as ckpt_lib
from jaxsae import grammars
from jaxsae import jsonio
from jaxsae import losses as losses_lib
from jaxsae import model as model_lib
from jaxsae import sae as sae_lib
from jaxsae import sweep as sweep_lib

# ------------------------------------------------------------------------------------------------
# The sweepable fields.


def _nonneg(v):
  return None if v is None or (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)) \
      else "must be a finite number >= 0"


def _positive(v):
  return None if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) \
      else "must be a finite number > 0"


def _choice(options):
  return lambda v: None if v in options else f"must be one of {list(options)}"


def registry() -> list[sweep_lib.Field]:
  """Every field a sweep may set, with defaults (the e2e_sae conventions) and units."""
  F = sweep_lib.Field
  return [
      # Static: architecture and loss family (one compilation group per combination).
      F("activation", "relu", True, check=_choice(sae_lib.ACTIVATIONS),
        doc="SAE activation"),
      F("expansion", 4, True, check=lambda v: None if isinstance(v, int) and v > 0
        else "must be a positive int", doc="latents per input dimension (F = expansion × d)"),
      F("enc_bias", True, True, doc="encoder bias"),
      F("dec_bias", True, True, doc="decoder bias"),
      F("pre_bias", False, True, doc="pre-bias subtracted before encoding, added after decoding"),
      F("decoder_norm", "forward", True, check=_choice(sae_lib.DECODER_NORMS),
        doc="dictionary normalisation"),
      F("input_norm", False, True, doc="L2-normalise the SAE input (Menon 'input')"),
      F("recon_norm", False, True, doc="L2-normalise the reconstruction (Menon 'recon')"),
      F("init", "e2e", True, check=_choice(sae_lib.INITS), doc="initialisation scheme"),
      F("pre_bias_init", "zero", True, check=_choice(sae_lib.PRE_BIAS_INITS),
        doc="pre-bias init (data mean/median is an improvement)"),
      F("loss", "local", True, check=_choice(losses_lib.PRESETS),
        doc="loss preset: local, e2e or e2e_ds"),
      F("sparsity_p", 1.0, True, check=_positive, doc="order p of the sparsity norm"),
      F("sparsity_reduction", "e2e_sae", True, check=_choice(losses_lib.REDUCTIONS),
        doc="e2e_sae (mean over tokens / d) or sum_batch (Menon: sum over the batch)"),
      F("include_final_resid", True, True,
        doc="in_to_orig includes the final resid_post (the e2e paper omitted it)"),
      F("splice_mode", "corrected", True, check=_choice(sae_lib.SPLICE_MODES),
        doc="how normalised SAEs are spliced in (corrected rescales to ‖x‖)"),
      F("causal", False, True, doc="add the causal-interpolation term (β = causal_coeff)"),
      F("causal_lambda", "step", True, check=_choice(losses_lib.CAUSAL_LAMBDAS),
        doc="interpolation λ: U(0,1) per step, per token, or fixed (causal_lambda_value)"),
      F("causal_target", "sae", True, check=_choice(losses_lib.CAUSAL_TARGETS),
        doc="interpolated target logits: of the SAE-spliced run (paper) or the clean run"),
      F("causal_distance", "mse", True, check=_choice(losses_lib.CAUSAL_DISTANCES),
        doc="distance of the causal term: MSE on logits or KL"),
      # Dynamic: stacked per variant.
      F("lr", 1e-3, False, check=_positive, doc="peak learning rate"),
      F("seed", 0, False, np.int32, doc="SAE init seed (same seed + architecture = same init)"),
      F("k", 0, False, np.int32, doc="TopK / BatchTopK latents per token"),
      F("sparsity_coeff", 0.0, False, check=_nonneg, doc="sparsity coefficient (λ or α)"),
      F("out_to_in_coeff", None, False, check=_nonneg,
        doc="local MSE coefficient (None: the preset's)"),
      F("logits_kl_coeff", None, False, check=_nonneg, doc="KL coefficient (None: preset's)"),
      F("in_to_orig_coeff", None, False, check=_nonneg,
        doc="downstream MSE coefficient (None: preset's)"),
      F("jumprelu_bandwidth", 1e-3, False, check=_positive, doc="JumpReLU STE bandwidth"),
      F("jumprelu_init_threshold", 1e-3, False, check=_positive, doc="JumpReLU initial θ"),
      F("threshold_decay", 0.99, False, doc="BatchTopK inference-threshold EMA decay"),
      F("causal_coeff", 0.0, False, check=_nonneg, doc="β of the causal-interpolation term"),
      F("causal_lambda_value", 0.2, False, check=lambda v: None if 0 <= v <= 1
        else "must lie in [0, 1]", doc="λ when causal_lambda='fixed' (paper: 0.2 or 0.02)"),
      F("causal_start", 0, False, np.int32, check=_nonneg,
        doc="step at which the causal term starts (plain pre-training before; steps)"),
      F("causal_ramp", 0, False, np.int32, check=_nonneg,
        doc="steps over which β ramps linearly from 0 after causal_start (0: constant β)"),
      F("causal_lr_scale", 1.0, False, check=_positive,
        doc="lr multiplier from causal_start on (fine-tuning at a lower lr)"),
      F("causal_reset_opt", False, False, doc="fresh Adam state at causal_start (> 0)"),
  ]


_COEFF_FIELDS = {"out_to_in": "out_to_in_coeff", "logits_kl": "logits_kl_coeff",
                 "in_to_orig": "in_to_orig_coeff"}


@flax.struct.dataclass
class CausalHparams:
  """Per-variant schedule of the causal term (leading axis N in a group)."""

  lambda_value: Any  # float: λ when causal_lambda == 'fixed'
  start: Any  # int: first step with the causal term (and the lr scale)
  ramp: Any  # int: β ramp length in steps (0: constant)
  lr_scale: Any  # float: lr multiplier from `start` on
  reset_opt: Any  # bool: fresh Adam state at `start` (when start > 0)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """A compilation group: static SAE and loss structure plus stacked per-variant values.

  Arrays have a leading axis of `padded` entries: the `size` real variants, then copies of the
  last one that fill the group to a multiple of the mesh's variant axis (never reported).
  """

  name: str
  sae: sae_lib.SAEConfig
  loss: losses_lib.LossConfig
  splice_mode: str
  ids: tuple[str, ...]
  size: int
  padded: int
  hparams: sae_lib.SAEHparams
  coeffs: losses_lib.LossCoeffs
  lr: np.ndarray
  seed: np.ndarray
  values: tuple[Mapping[str, Any], ...]  # every field of each real variant (for reports)
  causal: CausalHparams | None = None


def _k_max_hook(static, members):
  if static["activation"] in ("topk", "batchtopk"):
    static["k_max"] = max(int(m.values["k"]) for m in members)
  else:
    static["k_max"] = None
  return static


def build_groups(sweep_blocks, d_model: int, n_variant_devices: int = 1
                 ) -> tuple[list[GroupSpec], list[sweep_lib.Group]]:
  """Validates the sweep and builds the groups (no compilation)."""
  reg = registry()
  variants = sweep_lib.expand(sweep_blocks, reg)
  resolved = []
  for v in variants:
    values = dict(v.values)
    preset = losses_lib.default_coeffs(losses_lib.LossConfig(preset=values["loss"]), 0.0)
    for term, field in _COEFF_FIELDS.items():
      if values[field] is None:
        values[field] = float(getattr(preset, term))
    if values["activation"] in ("topk", "batchtopk"):
      width = values["expansion"] * d_model
      if not 1 <= int(values["k"]) <= width:
        raise sweep_lib.SweepError(
            f"variant {v.id} ({v.label}): k={values['k']} must lie in [1, width={width}] for "
            f"activation={values['activation']}; set k in the sweep or widen the SAE")
    resolved.append(dataclasses.replace(v, values=values))
  groups = sweep_lib.group(resolved, reg, derive=_k_max_hook)
  specs = []
  for g in groups:
    s = g.static
    sae_cfg = sae_lib.SAEConfig(
        d_in=d_model, width=s["expansion"] * d_model, activation=s["activation"],
        k_max=s["k_max"], enc_bias=s["enc_bias"] and not s["activation"].startswith("sparsemax"),
        dec_bias=s["dec_bias"], pre_bias=s["pre_bias"], decoder_norm=s["decoder_norm"],
        input_norm=s["input_norm"], recon_norm=s["recon_norm"], init=s["init"],
        pre_bias_init=s["pre_bias_init"])
    loss_cfg = losses_lib.LossConfig(preset=s["loss"], sparsity_p=float(s["sparsity_p"]),
                                     sparsity_reduction=s["sparsity_reduction"],
                                     include_final_resid=s["include_final_resid"],
                                     causal=s["causal"], causal_lambda=s["causal_lambda"],
                                     causal_target=s["causal_target"],
                                     causal_distance=s["causal_distance"])
    n = g.size
    padded = -(-n // n_variant_devices) * n_variant_devices
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], padded - n, axis=0)])
    d = {k: pad(v) for k, v in g.dynamic.items()}
    hparams = sae_lib.SAEHparams(
        k=np.maximum(d["k"], 1).astype(np.int32) if sae_cfg.uses_k else d["k"].astype(np.int32),
        jumprelu_bandwidth=d["jumprelu_bandwidth"].astype(np.float32),
        jumprelu_init_threshold=d["jumprelu_init_threshold"].astype(np.float32),
        threshold_decay=d["threshold_decay"].astype(np.float32))
    coeffs = losses_lib.LossCoeffs(
        sparsity=d["sparsity_coeff"].astype(np.float32),
        out_to_in=d["out_to_in_coeff"].astype(np.float32),
        logits_kl=d["logits_kl_coeff"].astype(np.float32),
        in_to_orig=d["in_to_orig_coeff"].astype(np.float32),
        causal=d["causal_coeff"].astype(np.float32))
    causal = CausalHparams(
        lambda_value=d["causal_lambda_value"].astype(np.float32),
        start=d["causal_start"].astype(np.int32), ramp=d["causal_ramp"].astype(np.int32),
        lr_scale=d["causal_lr_scale"].astype(np.float32),
        reset_opt=d["causal_reset_opt"].astype(bool))
    sae_lib.check_hparams(hparams, sae_cfg)
    losses_lib.check_coeffs(coeffs)
    specs.append(GroupSpec(
        name=g.name, sae=sae_cfg, loss=loss_cfg, splice_mode=s["splice_mode"], ids=g.ids,
        size=n, padded=padded, hparams=hparams, coeffs=coeffs,
        lr=d["lr"].astype(np.float32), seed=d["seed"].astype(np.int32),
        values=tuple(dict(v.values, **{k: g.static[k] for k in ("k_max",)})
                     for v in g.variants), causal=causal))
  return specs, groups


# ------------------------------------------------------------------------------------------------
# State.


@flax.struct.dataclass
class GroupState:
  """Training state of one group (every leaf has the leading variant axis N)."""

  params: Any
  opt_state: Any
  sae_state: sae_lib.SAEState
  frozen: jax.Array  # bool [N]: stopped after a non-finite loss or gradient
  bad_step: jax.Array  # int32 [N]: step of the first non-finite value, -1 if none


@flax.struct.dataclass
class GridState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  groups: tuple[GroupState, ...]


@flax.struct.dataclass
class GroupHyper:
  """Constant per-variant inputs of one group (leading axis N)."""

  hparams: sae_lib.SAEHparams
  coeffs: losses_lib.LossCoeffs
  lr: jax.Array
  seed: jax.Array  # int32: the variant's seed (with the step, keys its causal λ draws)
  causal: CausalHparams


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run (hashable parts feed `jit`)."""

  grammar: grammars.Grammar
  model_config: model_lib.ModelConfig
  site: str
  specs: tuple[GroupSpec, ...]
  batch_size: int
  max_len: int
  forward_len: int
  positions: str
  capacity: int  # selected tokens gathered per step for local groups
  schedule: str
  warmup_steps: int
  total_steps: int  # cosine horizon (config.decay_steps, or config.steps)
  lr_floor: float  # final lr as a fraction of the peak (cosine schedule)
  grad_clip: float
  adam: tuple[float, float, float]
  mesh: Any
  variant_loop: str = "vmap"  # 'vmap' or 'map' (see `resolve_variant_loop`)

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def _optimizer(setup: Setup) -> optax.GradientTransformation:
  b1, b2, eps = setup.adam
  return optax.chain(optax.clip_by_global_norm(setup.grad_clip),
                     optax.scale_by_adam(b1=b1, b2=b2, eps=eps))


def schedule_factor(step: jax.Array, setup: Setup) -> jax.Array:
  """Multiplier of the peak lr at `step` (0-based): constant, or warm-up + cosine to a floor."""
  step = jnp.asarray(step, jnp.float32)
  if setup.schedule == "constant":
    return jnp.ones_like(step)
  warm = jnp.maximum(setup.warmup_steps, 1)
  ramp = jnp.minimum((step + 1) / warm, 1.0)
  span = jnp.maximum(setup.total_steps - setup.warmup_steps, 1)
  progress = jnp.clip((step - setup.warmup_steps) / span, 0.0, 1.0)
  cosine = setup.lr_floor + (1 - setup.lr_floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < setup.warmup_steps, ramp, cosine)


def init_group(spec: GroupSpec, setup: Setup, data_sample: jax.Array | None) -> GroupState:
  """Per-variant init from each variant's own seed (so grids equal separate runs)."""
  def one(seed, hp):
    params = sae_lib.init(jax.random.key(seed), spec.sae, data_sample=data_sample, hparams=hp)
    return params, _optimizer(setup).init(params)
  hparams = jax.tree.map(jnp.asarray, spec.hparams)
  params, opt_state = jax.vmap(one)(jnp.asarray(spec.seed), hparams)
  n = spec.padded
  sae_state = jax.vmap(lambda _: sae_lib.init_state(spec.sae))(jnp.arange(n))
  return GroupState(params=params, opt_state=opt_state, sae_state=sae_state,
                    frozen=jnp.zeros((n,), bool), bad_step=jnp.full((n,), -1, jnp.int32))


def group_hyper(spec: GroupSpec) -> GroupHyper:
  return GroupHyper(hparams=jax.tree.map(jnp.asarray, spec.hparams),
                    coeffs=jax.tree.map(jnp.asarray, spec.coeffs), lr=jnp.asarray(spec.lr),
                    seed=jnp.asarray(spec.seed),
                    causal=jax.tree.map(jnp.asarray, spec.causal))


# ------------------------------------------------------------------------------------------------
# One step.


@flax.struct.dataclass
class Batch:
  """What every group sees in a step (computed once)."""

  acts_BTD: jax.Array  # clean activation at the SAE site
  mask_BT: jax.Array  # selected tokens
  flat_CD: jax.Array  # selected tokens' activations, gathered (capacity C)
  flat_mask_C: jax.Array  # which of the C slots hold a token
  dropped: jax.Array  # selected tokens beyond the capacity this step
  clean_logits: jax.Array | None
  clean_downstream: dict[str, jax.Array]


def make_batch(lm_params, step: jax.Array, data_key: jax.Array, setup: Setup) -> Batch:
  """Samples the step's data and runs the clean forward once."""
  g, mc = setup.grammar, setup.model_config
  data = grammars.sample(jax.random.fold_in(data_key, step), g, setup.batch_size, setup.max_len)
  tokens = data.tokens[:, : setup.forward_len]
  if setup.positions == "sentence":
    mask = data.sentence_mask[:, : setup.forward_len]
  else:
    mask = tokens != g.pad_id
  if setup.mesh is not None and setup.mesh.shape["data"] > 1:
    tokens = jax.lax.with_sharding_constraint(tokens, NamedSharding(setup.mesh, P("data")))
  needs_full = any(s.loss.needs_clean_logits for s in setup.specs)
  ds_sites = sorted({h for s in setup.specs if s.loss.needs_downstream
                     for h in s.loss.downstream_sites(mc, setup.site)})
  clean = model_lib.apply(lm_params, tokens, mc, collect=(setup.site, *ds_sites),
                          stop_at=None if needs_full else setup.site)
  acts = clean.acts[setup.site]
  flat_mask = mask.reshape(-1)
  count = jnp.sum(flat_mask)
  (idx,) = jnp.nonzero(flat_mask, size=setup.capacity, fill_value=0)
  slot_ok = jnp.arange(setup.capacity) < count
  flat = acts.reshape(-1, acts.shape[-1])[idx]
  return Batch(acts_BTD=acts, mask_BT=mask, flat_CD=flat, flat_mask_C=slot_ok,
               dropped=jnp.maximum(count - setup.capacity, 0),
               clean_logits=clean.logits, clean_downstream={h: clean.acts[h] for h in ds_sites})


def _explained_variance(x_hat, x, mask):
  """e2e_sae's form: mean over tokens of 1 − Σ_d (x̂−x)² / Σ_d (x − mean_tokens x)²."""
  w = mask.astype(jnp.float32)
  lead = tuple(range(x.ndim - 1))
  mean = jnp.sum(w[..., None] * x, axis=lead, keepdims=True) / jnp.maximum(jnp.sum(w), 1)
  num = jnp.sum(jnp.square(x_hat - x), -1)
  den = jnp.maximum(jnp.sum(jnp.square(x - mean), -1), 1e-12)
  return jnp.sum(w * (1 - num / den)) / jnp.maximum(jnp.sum(w), 1)


def _causal_term(params, codes_BTF, x_BTD, out_BTD, spliced_logits, batch: Batch, lm_params,
                 rng, lam_fixed, spec: GroupSpec, setup: Setup):
  """The causal-interpolation distance of one variant (see `losses_lib` for the formula).

  Every selected token i carries D(z_i + λ(z_j(i) − z_i)) (the SAE's own decoder: biases,
  decoder norm, recon norm and the splice mode's rescaling) in one spliced forward; other
  positions keep the clean activation. All arrays stay position-aligned.
  """
  cfg, lcfg, mask = spec.sae, spec.loss, batch.mask_BT
  j_BT = losses_lib.nearest_neighbours(codes_BTF, mask)
  lam = losses_lib.draw_lambda(rng, lcfg.causal_lambda, lam_fixed, mask.shape)
  x_hat_BTD = sae_lib.decode(params, losses_lib.interpolate(codes_BTF, j_BT, lam), cfg)
  interp_BTD = sae_lib.to_model_space(x_hat_BTD, x_BTD, cfg, spec.splice_mode, mask)
  logits = model_lib.apply_from(lm_params, setup.site, interp_BTD, setup.model_config).logits
  if lcfg.causal_target == "clean":
    y = batch.clean_logits
  elif spliced_logits is not None:
    y = spliced_logits
  else:
    y = model_lib.apply_from(lm_params, setup.site, out_BTD, setup.model_config).logits
  target = losses_lib.interpolate(jax.lax.stop_gradient(y), j_BT, lam)
  return losses_lib.causal_distance(logits, target, mask, lcfg.causal_distance)


def _variant_loss(params, sae_state, hparams, coeffs, batch: Batch, lm_params, spec: GroupSpec,
                  setup: Setup, rng=None, lam_fixed=None):
  """Loss and metrics of ONE variant (vmapped over the group)."""
  cfg, lcfg = spec.sae, spec.loss
  if lcfg.needs_sequences:
    # The SAE runs on the tokens flattened to [B·T, D], the layout of the local groups (XLA's
    # CPU backend transposes [B, T, F] code gradients for the encoder's weight gradient).
    b, t, d = batch.acts_BTD.shape
    mask = batch.mask_BT.reshape(b * t)
    out_ND, codes, aux = sae_lib.splice(params, batch.acts_BTD.reshape(b * t, d), cfg, hparams,
                                        spec.splice_mode, mask=mask, state=sae_state, train=True)
    out = out_ND.reshape(b, t, d)
    extra = {}
    spliced_logits = None
    if lcfg.needs_spliced_forward:
      ds = lcfg.downstream_sites(setup.model_config, setup.site) if lcfg.needs_downstream else ()
      res = model_lib.apply_from(lm_params, setup.site, out, setup.model_config, collect=ds)
      spliced_logits = res.logits
      flat = lambda v: v.reshape(b * t, v.shape[-1])
      extra = dict(clean_logits=flat(batch.clean_logits), spliced_logits=flat(res.logits))
      if ds:
        extra.update(spliced_acts={h: flat(res.acts[h]) for h in ds},
                     clean_acts={h: flat(batch.clean_downstream[h]) for h in ds})
    if lcfg.causal:
      extra["causal"] = _causal_term(params, codes.reshape(b, t, -1), batch.acts_BTD, out,
                                     spliced_logits, batch,
                                     lm_params, rng, lam_fixed, spec, setup)
  else:
    # Local training always encodes as configured (input_norm applies); the splice mode
    # matters only where the SAE output enters the model.
    mask = batch.flat_mask_C
    _, codes, aux = sae_lib.forward(params, batch.flat_CD, cfg, hparams, state=sae_state,
                                    train=True, mask=mask)
    extra = {}
  x_hat = aux["x_hat"]
  sparse_codes = aux["gates"] if cfg.activation == "jumprelu" else codes
  terms = losses_lib.compute_terms(lcfg, d_in=cfg.d_in, codes=sparse_codes, x_hat=x_hat,
                                   target=aux["target"], mask=mask, **extra)
  total, terms = losses_lib.total_loss(terms, coeffs)
  w = mask.astype(jnp.float32)
  # Per-latent counts of masked-in tokens where it fires, as one matrix-vector product (XLA's
  # CPU backend fuses the comparison into it; an integer reduction over [tokens, F] costs as
  # much as an SAE matrix multiply there).
  fires_F = jnp.einsum("n,nf->f", w, (jax.lax.stop_gradient(codes) != 0).astype(jnp.float32))
  metrics = dict(terms)
  metrics["loss"] = total
  metrics["l0"] = jnp.sum(fires_F) / jnp.maximum(jnp.sum(w), 1)
  metrics["explained_variance"] = _explained_variance(x_hat, aux["target"], mask)
  return total, (metrics, aux["state"], fires_F > 0)


def _group_step(state: GroupState, hyper: GroupHyper, batch: Batch, lm_params, step,
                spec: GroupSpec, setup: Setup):
  """One optimizer step for every variant of a group."""
  grad_fn = jax.value_and_grad(_variant_loss, has_aux=True)
  tx = _optimizer(setup)
  lr_factor = schedule_factor(step, setup)

  def one(params, opt_state, sae_state, frozen, bad_step, hparams, coeffs, lr, seed, causal):
    started = step >= causal.start
    if spec.loss.causal:
      # β follows its ramp; a fresh Adam state at the start of the fine-tuning phase.
      coeffs = coeffs.replace(
          causal=coeffs.causal * losses_lib.causal_ramp(step, causal.start, causal.ramp))
      reset = causal.reset_opt & (causal.start > 0) & (step == causal.start)
      fresh = tx.init(params)
      opt_state = jax.tree.map(lambda f, o: jnp.where(reset, f, o), fresh, opt_state)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _CAUSAL_STREAM)
    (loss, (metrics, new_sae_state, fired)), grads = grad_fn(
        params, sae_state, hparams, coeffs, batch, lm_params, spec, setup, rng,
        causal.lambda_value)
    grads = sae_lib.project_gradients(params, grads, spec.sae)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, opt_state, params)
    lr_t = lr * lr_factor * jnp.where(started, causal.lr_scale, 1.0)
    new_params = jax.tree.map(lambda p, u: p - lr_t * u, params, updates)
    new_params = sae_lib.renormalize(new_params, spec.sae)
    ok = finite & ~frozen
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    metrics = dict(metrics, grad_norm=grad_norm, lr=lr_t)
    if spec.loss.causal:
      metrics["causal_beta"] = coeffs.causal
    return (keep(new_params, params), keep(new_opt, opt_state), keep(new_sae_state, sae_state),
            frozen | ~finite, jnp.where((bad_step < 0) & ~finite, step, bad_step), metrics,
            fired & ok)

  out = over_variants(one, setup.variant_loop)(
      state.params, state.opt_state, state.sae_state, state.frozen, state.bad_step,
      hyper.hparams, hyper.coeffs, hyper.lr, hyper.seed, hyper.causal)
  params, opt_state, sae_state, frozen, bad_step, metrics, fired = out
  return GroupState(params, opt_state, sae_state, frozen, bad_step), metrics, fired


_CAUSAL_STREAM = 7  # folded into (variant seed, step) for the causal term's λ draws


def over_variants(fn, variant_loop: str):
  """`fn` (written for one variant) applied over the leading variant axis of every argument.

  'vmap' batches the variants into one program (accelerators). 'map' runs them one after
  another inside the compiled step (`lax.map`): on CPU, XLA's batched matrix multiplies with a
  large output run 3-4x slower than the same multiplies one variant at a time (measured:
  a vmapped ReLU SAE step over 8 variants at 4,096 tokens × 128 → 1,024 took 518 ms vmapped
  and 197 ms as a map), so CPU runs take the map. Results are the same up to float rounding.
  """
  if variant_loop == "vmap":
    return jax.vmap(fn)
  return lambda *args: jax.lax.map(lambda a: fn(*a), args)


VARIANT_LOOPS = ("auto", "vmap", "map")


def resolve_variant_loop(choice: str, mesh) -> str:
  """'auto': 'map' on a CPU backend with one device on the variant axis, else 'vmap'."""
  if choice not in VARIANT_LOOPS:
    raise ValueError(f"config.variant_loop={choice!r}: use one of {VARIANT_LOOPS}")
  if choice != "auto":
    return choice
  cpu = jax.default_backend() == "cpu"
  return "map" if cpu and mesh.shape["variant"] == 1 else "vmap"


def train_chunk(state: GridState, hypers: tuple[GroupHyper, ...], lm_params, data_key,
                *, setup: Setup, num_steps: int):
  """`num_steps` steps in one `lax.scan`; returns the new state and per-group metrics
  (mean over the steps) with the dead-latent fraction over the chunk's tokens."""
  def body(carry, _):
    grid, fired = carry
    batch = make_batch(lm_params, grid.step, data_key, setup)
    new_groups, metrics, new_fired = [], [], []
    for spec, gs, hyper, f in zip(setup.specs, grid.groups, hypers, fired):
      gs, m, fd = _group_step(gs, hyper, batch, lm_params, grid.step, spec, setup)
      m = dict(m, dropped_tokens=jnp.broadcast_to(batch.dropped, (spec.padded,)).astype(
          jnp.float32))
      new_groups.append(gs)
      metrics.append(m)
      new_fired.append(f | fd)
    return (GridState(step=grid.step + 1, groups=tuple(new_groups)), tuple(new_fired)), \
        tuple(metrics)

  fired0 = tuple(jnp.zeros((s.padded, s.sae.width), bool) for s in setup.specs)
  (state, fired), metrics = jax.lax.scan(body, (state, fired0), None, length=num_steps)
  summary = []
  for m, f in zip(metrics, fired):
    mean = {k: jnp.mean(v, axis=0) for k, v in m.items()}
    mean["dead_fraction"] = 1.0 - jnp.mean(f.astype(jnp.float32), axis=-1)
    mean["lr"] = m["lr"][-1]
    summary.append(mean)
  return state, tuple(summary)


# ------------------------------------------------------------------------------------------------
# The job.


@dataclasses.dataclass(frozen=True)
class LoadedLM:
  params: Any
  model_config: model_lib.ModelConfig
  language: str
  step: int
  config: Mapping[str, Any]


def load_lm(lm_workdir: str) -> LoadedLM:
  """Loads the newest valid LM checkpoint of a `train_lm` workdir (params only)."""
  from jaxsae import train_lm  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(lm_workdir, "config.json")
  ckpt_dir = os.path.join(lm_workdir, "checkpoints")
  if not os.path.exists(cfg_path) or not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f"no trained LM in {lm_workdir!r} (config.json / checkpoints missing); train one with "
        f"python -m experiments.main --config=experiments/configs/lm.py:language=<name> "
        f"--workdir={lm_workdir}, or point config.lm_workdir at an LM workdir")
  with open(cfg_path) as f:
    lm_config = ml_collections.ConfigDict(json.load(f))
  template = jax.eval_shape(lambda: train_lm.init_state(lm_config))
  with ckpt_lib.Checkpointer(ckpt_dir) as ckpt:
    if not ckpt.all_steps():
      raise FileNotFoundError(f"{ckpt_dir!r} holds no checkpoint; finish the LM run first")
    restored = ckpt.restore(template)
  return LoadedLM(params=restored.state.params,
                  model_config=train_lm.model_config_for(lm_config),
                  language=lm_config.language, step=int(restored.state.step),
                  config=lm_config.to_dict())


MUTABLE_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints")
_DATA_STREAM, _PROBE_STREAM = 1, 2


def validate_config(config) -> None:
  """Checks the non-sweep fields before anything is loaded or compiled."""
  def need(cond, msg):
    if not cond:
      raise ValueError(msg)
  need(config.positions in ("sentence", "all"),
       f"config.positions={config.positions!r}: use 'sentence' (sentence tokens) or 'all' "
       "(every non-pad position)")
  for name in ("batch_size", "steps", "log_every", "checkpoint_every"):
    need(isinstance(config[name], int) and config[name] > 0,
         f"config.{name}={config[name]!r} must be a positive int")
  for name in ("max_len", "forward_len"):
    need(isinstance(config[name], int) and config[name] >= 0,
         f"config.{name}={config[name]!r} must be an int >= 0 (0: the LM's sequence length)")
  need(config.steps % config.log_every == 0 and config.checkpoint_every % config.log_every == 0,
       f"config.steps ({config.steps}) and config.checkpoint_every ({config.checkpoint_every}) "
       f"must be multiples of config.log_every ({config.log_every})")
  need(config.schedule in ("constant", "warmup_cosine"),
       f"config.schedule={config.schedule!r}: use 'constant' (Menon) or 'warmup_cosine' (e2e)")
  need(0 <= config.lr_floor <= 1, f"config.lr_floor={config.lr_floor} must lie in [0, 1]")
  need(config.grad_clip > 0, f"config.grad_clip={config.grad_clip} must be > 0")


def _mesh(config) -> Any:
  devices = jax.devices()
  n = len(devices)
  n_var = n if config.mesh_variant_devices in (-1, None) else config.mesh_variant_devices
  if n_var < 1 or n % n_var:
    raise ValueError(f"config.mesh_variant_devices={config.mesh_variant_devices} must divide "
                     f"the {n} devices (or be -1 for all of them)")
  n_data = n // n_var
  if config.batch_size % n_data:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{n_data} data-parallel devices; change batch_size or "
                     "mesh_variant_devices")
  return jax.sharding.Mesh(np.array(devices).reshape(n_var, n_data), ("variant", "data"))


def _probe_capacity(grammar, batch_size, max_len, forward_len, positions, token_capacity,
                    key) -> int:
  """Selected tokens per batch: 1.25 × the most seen in 16 probe batches (multiple of 8)."""
  full = batch_size * forward_len
  if positions == "all" or token_capacity == -1:
    return full
  if token_capacity > 0:
    return min(full, token_capacity)
  counts = []
  for i in range(16):
    b = grammars.sample(jax.random.fold_in(key, i), grammar, batch_size, max_len)
    counts.append(int(np.asarray(b.sentence_mask[:, :forward_len]).sum()))
  return int(min(full, -(-int(1.25 * max(counts)) // 8) * 8))


def prepare(config, workdir: str | None = None):
  """Validates everything and builds the static setup (no compilation)."""
  validate_config(config)
  lm = load_lm(config.lm_workdir)
  if config.language and config.language != lm.language:
    raise ValueError(f"config.language={config.language!r} but the LM in {config.lm_workdir!r} "
                     f"was trained on {lm.language!r}; point lm_workdir at a {config.language} "
                     "LM or change language")
  mc = lm.model_config
  max_len = config.max_len or int(lm.config["max_len"])
  forward_len = config.forward_len or max_len
  if not 8 < forward_len <= max_len <= mc.context:
    raise ValueError(f"need 8 < forward_len ({forward_len}) <= max_len ({max_len}) <= the LM's "
                     f"context ({mc.context}); fix config.max_len / config.forward_len (0 = the "
                     "LM's sequence length)")
  names = model_lib.site_names(mc)
  if config.site not in names:
    raise ValueError(f"config.site={config.site!r} is not a site of the model; valid sites: "
                     f"{', '.join(names)}")
  if not config.site.startswith(("resid_pre", "resid_post")):
    raise ValueError(f"config.site={config.site!r}: SAEs train on residual-stream sites "
                     "(resid_pre.{l} / resid_post.{l})")
  mesh = _mesh(config)
  specs, _ = build_groups(list(config.sweep), mc.d_model, mesh.shape["variant"])
  for s in specs:
    if s.loss.needs_downstream and not s.loss.downstream_sites(mc, config.site):
      raise ValueError(f"group {s.name} uses e2e_ds but no resid_post follows {config.site} "
                       "(include_final_resid=False); include the final resid or use e2e")
  grammar = grammars.get(lm.language)
  root = jax.random.key(config.seed)
  capacity = _probe_capacity(grammar, config.batch_size, max_len, forward_len, config.positions,
                             config.token_capacity, jax.random.fold_in(root, _PROBE_STREAM))
  setup = Setup(
      grammar=grammar, model_config=mc, site=config.site, specs=tuple(specs),
      batch_size=config.batch_size, max_len=max_len, forward_len=forward_len,
      positions=config.positions, capacity=capacity, schedule=config.schedule,
      warmup_steps=config.warmup_steps, total_steps=config.decay_steps or config.steps,
      lr_floor=config.lr_floor,
      grad_clip=config.grad_clip, adam=(config.adam_b1, config.adam_b2, config.adam_eps),
      mesh=mesh, variant_loop=resolve_variant_loop(config.get("variant_loop", "auto"), mesh))
  return setup, lm, root


def _data_sample(lm, setup: Setup, root) -> jax.Array | None:
  """Activations for data-dependent pre-bias inits (mean / median)."""
  if not any(s.sae.pre_bias and s.sae.pre_bias_init != "zero" for s in setup.specs):
    return None
  batch = make_batch(lm.params, jnp.int32(0), jax.random.fold_in(root, _PROBE_STREAM + 1), setup)
  return batch.flat_CD[: int(np.asarray(batch.flat_mask_C).sum())]


def init_grid(setup: Setup, lm, root) -> GridState:
  sample = _data_sample(lm, setup, root)
  return GridState(step=jnp.int32(0),
                   groups=tuple(init_group(s, setup, sample) for s in setup.specs))


def _shard(tree, setup: Setup, spec=P("variant")):
  return jax.device_put(tree, NamedSharding(setup.mesh, spec))


def state_shardings(setup: Setup, state: GridState) -> GridState:
  """Replicated step, variant-sharded groups (also the jit's output shardings, so the state
  fed back in matches and nothing recompiles)."""
  return GridState(step=NamedSharding(setup.mesh, P()),
                   groups=jax.tree.map(lambda _: NamedSharding(setup.mesh, P("variant")),
                                       state.groups))


def place_state(state: GridState, setup: Setup) -> GridState:
  return jax.device_put(state, state_shardings(setup, state))


def make_chunk_fn(setup: Setup, num_steps: int, state_template: GridState):
  """The jitted chunk of `num_steps` steps; the state is donated and keeps its shardings."""
  return jax.jit(functools.partial(train_chunk, setup=setup, num_steps=num_steps),
                 donate_argnums=(0,),
                 out_shardings=(state_shardings(setup, state_template),
                                NamedSharding(setup.mesh, P("variant"))))


def _append_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _truncate_jsonl(path: str, step: int) -> None:
  """Drops records after `step` (they belong to steps the checkpoint does not hold)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if json.loads(line).get("step", 0) <= step]
  with open(path, "w") as f:
    f.writelines(keep)


def run(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the SAE grid of `config` in `workdir`; returns the summary."""
  if config.get("distributed", False):
    jax.distributed.initialize()
  setup, lm, root = prepare(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=1)
  _write_variants(os.path.join(workdir, "variants.json"), setup)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summary_path = os.path.join(workdir, "summary.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  hypers = _shard(tuple(group_hyper(s) for s in setup.specs), setup)
  lm_params = _shard(lm.params, setup, P())
  data_key = jax.random.fold_in(root, _DATA_STREAM)
  with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints) as ckpt:
    ckpt_lib.check_fingerprint(ckpt_dir, config, MUTABLE_FIELDS,
                               has_checkpoints=bool(ckpt.all_steps()))
    if ckpt.all_steps():
      template = jax.eval_shape(lambda: init_grid(setup, lm, root))
      restored = ckpt.restore(template)
      state = restored.state
      logging.info("Resuming the SAE grid at step %d.", int(state.step))
    else:
      state = init_grid(setup, lm, root)
    state = place_state(GridState(step=jnp.asarray(state.step, jnp.int32),
                                  groups=tuple(state.groups)), setup)
    start = int(state.step)
    if start % config.log_every:
      raise ValueError(f"the checkpoint is at step {start}, not a multiple of log_every="
                       f"{config.log_every}; resume with a log_every that divides it")
    _truncate_jsonl(metrics_path, start)
    chunk = make_chunk_fn(setup, config.log_every, state)
    last = {}
    n_variants = sum(s.size for s in setup.specs)
    frozen_seen = {s.name: np.zeros(s.padded, bool) for s in setup.specs}
    for step in range(start, config.steps, config.log_every):
      t0 = time.perf_counter()
      state, metrics = chunk(state, hypers, lm_params, data_key)
      metrics = jax.device_get(metrics)
      frozen = [np.asarray(g.frozen) for g in state.groups]
      bad = [np.asarray(g.bad_step) for g in state.groups]
      dt = time.perf_counter() - t0
      new_step = step + config.log_every
      records = []
      for spec, m, fz, bs in zip(setup.specs, metrics, frozen, bad):
        for i, vid in enumerate(spec.ids):
          rec = {"step": new_step, "variant": vid, "group": spec.name,
                 **{k: jsonio.finite_or_str(v[i]) for k, v in m.items()}, "frozen": bool(fz[i])}
          records.append(rec)
          last[vid] = rec
          if fz[i] and not frozen_seen[spec.name][i]:
            logging.warning("variant %s (group %s, %s) hit a non-finite loss/gradient at step "
                            "%d and is frozen at its last finite parameters.", vid, spec.name,
                            json.dumps(_jsonable(spec.values[i])), int(bs[i]))
        frozen_seen[spec.name] = frozen_seen[spec.name] | fz
      _append_jsonl(metrics_path, records)
      eta = (config.steps - new_step) * dt / config.log_every
      toks = setup.batch_size * setup.forward_len * config.log_every / dt
      losses_txt = " ".join(f"{s.name}:{np.mean(m['loss'][:s.size]):.4g}"
                            for s, m in zip(setup.specs, metrics))
      logging.info("step %d/%d  %s  %.0f tok/s (x%d variants)  ETA %.0f s", new_step,
                   config.steps, losses_txt, toks, n_variants, eta)
      if new_step % config.checkpoint_every == 0 or new_step == config.steps:
        ckpt.save(new_step, state, metadata={"language": lm.language})
  summary = _summary(setup, state, last, lm, config)
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
  return {k: sweep_lib.to_json(v) for k, v in values.items()}


def _write_variants(path: str, setup: Setup) -> None:
  out = {"groups": [], "variants": []}
  for s in setup.specs:
    out["groups"].append({"name": s.name, "size": s.size, "padded": s.padded,
                          "sae": dataclasses.asdict(s.sae), "loss": dataclasses.asdict(s.loss),
                          "splice_mode": s.splice_mode})
    for i, vid in enumerate(s.ids):
      out["variants"].append({"id": vid, "group": s.name, "position": i,
                              "hparams": _jsonable(s.values[i])})
  out["variants"].sort(key=lambda v: v["id"])
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


def _summary(setup: Setup, state: GridState, last, lm, config) -> dict[str, Any]:
  variants = {}
  for spec, g in zip(setup.specs, state.groups):
    frozen, bad = np.asarray(g.frozen), np.asarray(g.bad_step)
    for i, vid in enumerate(spec.ids):
      variants[vid] = {"group": spec.name, "hparams": _jsonable(spec.values[i]),
                       "frozen": bool(frozen[i]), "bad_step": int(bad[i]),
                       "metrics": {k: v for k, v in last.get(vid, {}).items()
                                   if k not in ("variant", "group", "frozen")}}
  return {"language": lm.language, "site": setup.site, "positions": setup.positions,
          "steps": int(state.step),
          "lm_step": lm.step, "token_capacity": setup.capacity, "variants": variants}


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained grid read back from an `sae` workdir (see `load_trained`)."""

  config: Any  # the run's ConfigDict (from config.json)
  setup: Setup
  lm: LoadedLM
  state: GridState  # the latest checkpoint
  hypers: tuple[GroupHyper, ...]


def load_trained(workdir: str, step: int | None = None) -> Trained:
  """Rebuilds the setup of the `sae` run in `workdir` and restores its checkpoint.

  Args:
    workdir: the SAE job's workdir (config.json and checkpoints/).
    step: checkpoint step to restore (default: the latest).

  Raises:
    FileNotFoundError: no config.json or no checkpoint (the message says which job to run).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not an sae job workdir; train "
                            "the grid first (python -m experiments.main --config="
                            "experiments/configs/sae_*.py --workdir=...)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  setup, lm, root = prepare(config, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=max(int(config.keep_checkpoints), 1)) as ckpt:
    if not ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; the sae job in {workdir!r} has "
                              "not saved one yet (rerun it to finish training)")
    template = jax.eval_shape(lambda: init_grid(setup, lm, root))
    state = ckpt.restore(template, step).state
  state = place_state(GridState(step=jnp.asarray(state.step, jnp.int32),
                                groups=tuple(state.groups)), setup)
  hypers = _shard(tuple(group_hyper(s) for s in setup.specs), setup)
  return Trained(config=config, setup=setup, lm=lm, state=state, hypers=hypers)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One SAE of a trained grid, taken out of its group's stacked arrays (see `variant`)."""

  params: Any  # the SAE's parameters, without the variant axis
  sae_config: sae_lib.SAEConfig
  hparams: sae_lib.SAEHparams
  sae_state: sae_lib.SAEState
  splice_mode: str
  spec_index: int  # its group: trained.setup.specs[spec_index]
  position: int  # its index in the group's stacked arrays (spec.ids[position])


def variant(trained: Trained, variant_id: str) -> Variant:
  """One SAE of `trained` by id, ready for `sae.splice_fn`, `interventions` or `causality`.

  Args:
    trained: `load_trained(...)` output.
    variant_id: the SAE's id (`summary.json`'s `variants`, `trained.setup.specs[g].ids`).

  Raises:
    ValueError: an id the grid does not have (the message lists the known ids).
  """
  for gi, spec in enumerate(trained.setup.specs):
    if variant_id in spec.ids:
      i = spec.ids.index(variant_id)
      group = trained.state.groups[gi]
      pick = functools.partial(jax.tree.map, lambda x: x[i])
      return Variant(params=pick(group.params), sae_config=spec.sae,
                     hparams=pick(trained.hypers[gi].hparams), sae_state=pick(group.sae_state),
                     splice_mode=spec.splice_mode, spec_index=gi, position=i)
  known = [vid for spec in trained.setup.specs for vid in spec.ids]
  shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
  raise ValueError(f"variant_id={variant_id!r} is not in this grid; its SAEs are {shown} (the "
                   "keys of summary.json's 'variants').")

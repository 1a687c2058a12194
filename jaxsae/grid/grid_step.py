"""One training step of every SAE variant of a grid, and `lax.scan` chunks of steps.

Per step, one batch is drawn on device from (seed, step) and the frozen LM runs ONCE up to the
SAE site (to the logits, with the downstream sites collected, only if some group needs them).
Each group's variants are stacked on a leading axis N and updated by one function written for
one variant, applied with `jax.vmap` (accelerators) or `lax.map` (CPU, where XLA's batched
matrix multiplies are slow; see `variant_axis.over_variants`):

- local groups train on the activations of the selected tokens, gathered into a fixed-capacity
  buffer (sentence tokens are ~6-40% of positions, so padding costs nothing), and never run the
  downstream model;
- e2e / e2e+ds groups splice each variant's SAE at the site (on the selected tokens), run the
  frozen rest of the model from there (`model.apply_from`) and compare with the clean logits
  computed once; gradients reach SAE params only;
- groups with the causal-interpolation term (`causal=True`, any preset) also splice, at every
  selected token, the decoded interpolation towards its nearest latent-space neighbour in the
  same sequence and match the interpolated target logits (`_causal_term`), with β per variant
  (constant or ramped), an optional plain pre-training phase and a fresh optimizer at a lower
  lr for the fine-tuning phase.

Transcoder groups (`GroupSpec.target_site` = 'mlp_out.{l}', the grid's site 'mlp_in.{l}') read
MLP l's input and stand for its output: local ones fit the clean MLP output at the selected
tokens (the same out_to_in reduction), e2e ones replace MLP l's output by theirs at the selected
tokens and resume the frozen model at resid_post.l. Their x̂'s target (every reconstruction
term, AuxK's residual, explained variance) is the MLP output; the batch collects it once.

Training recipes of the SAE itself are terms of the per-variant loss too: AuxK (`k_aux`: the
dead latents, by `SAEState.since_fired` before the step, fit the residual; the counters then
advance by the step's tokens), Matryoshka prefixes (`matryoshka`) and the gated SAE's sparsity
and auxiliary reconstruction, each logged at every coefficient; p-annealing (`p_anneal`) takes
the sparsity term's order from the variant's schedule at the step (logged as `sparsity_p`).
Dead-latent resampling (`resample_steps`) re-initialises, after the update of each of those
steps, the variant's dead latents from the step's inputs (`resample.py`; logged: `resampled`,
the latents re-initialised in a step).

What the variants share is computed once per step, outside the per-variant function: the clean
forward, its log-softmax (the KL target) and the downstream clean activations (`Batch`).
TopK / BatchTopK groups with the sparse decode (`sae.sparse_decode`) take the sparsity term and
the fired-latent counts from the active latents too (`active_codes`). Every per-step metric is
part of the chunk's logged means (only `lr` is taken at the last step, a scalar).

Each variant has its own Adam state, learning rate (× a shared schedule: constant, or linear
warm-up + cosine to a floor) and global-norm clip. A variant whose loss or gradients turn
non-finite keeps its last good parameters and is flagged (`frozen`, `bad_step`); the others are
untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsae import grammars
from jaxsae.core import variant_axis
from jaxsae.grid import active_codes
from jaxsae.grid import activations
from jaxsae.grid import losses as losses_lib
from jaxsae.grid import metrics as metrics_lib
from jaxsae.grid import resample as resample_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.grid.sae_groups import CausalHparams, GroupSpec, PAnnealHparams
from jaxsae.lm import model as model_lib

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
  p_anneal: PAnnealHparams | None = None  # groups with p-annealing only


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
                    causal=jax.tree.map(jnp.asarray, spec.causal),
                    p_anneal=jax.tree.map(jnp.asarray, spec.p_anneal))


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
  clean_logp: jax.Array | None  # log softmax of clean_logits (the KL target), once per batch
  clean_downstream: dict[str, jax.Array]
  # Transcoder groups (`GroupSpec.target_site`): the clean target activation, its selected
  # tokens gathered as `flat_CD`, and the residual stream MLP l adds to (e2e splicing).
  target_BTD: jax.Array | None = None
  flat_target_CD: jax.Array | None = None
  resid_mid_BTD: jax.Array | None = None


def target_site(setup: Setup) -> str:
  """The transcoder target of the grid's groups ('' if none has one; `grid_setup.check_targets`
  makes every group's the same)."""
  return next((s.target_site for s in setup.specs if s.target_site), "")


def make_batch(lm_params, step: jax.Array, data_key: jax.Array, setup: Setup) -> Batch:
  """Samples the step's data and runs the clean forward once."""
  g, mc = setup.grammar, setup.model_config
  data = grammars.sample(jax.random.fold_in(data_key, step), g, setup.batch_size, setup.max_len)
  tokens = data.tokens[:, : setup.forward_len]
  mask = grammars.selected_mask(g, data, setup.positions, setup.forward_len)
  if setup.mesh is not None and setup.mesh.shape["data"] > 1:
    tokens = jax.lax.with_sharding_constraint(tokens, NamedSharding(setup.mesh, P("data")))
  needs_full = any(s.loss.needs_clean_logits for s in setup.specs)
  ds_sites = sorted({h for s in setup.specs if s.loss.needs_downstream
                     for h in s.loss.downstream_sites(mc, setup.site)})
  target = target_site(setup)
  # A transcoder's spliced forward resumes after MLP l: resid_pre.l + attn_out.l + its output.
  layer = target.partition(".")[2]
  mid_sites = (f"resid_pre.{layer}", f"attn_out.{layer}") if target and any(
      s.loss.needs_spliced_forward for s in setup.specs) else ()
  clean = model_lib.apply(lm_params, tokens, mc,
                          collect=(setup.site, *mid_sites, *((target,) if target else ()),
                                   *ds_sites),
                          stop_at=None if needs_full else (target or setup.site))
  acts = clean.acts[setup.site]
  flat_mask = mask.reshape(-1)
  count = jnp.sum(flat_mask)
  (idx,) = jnp.nonzero(flat_mask, size=setup.capacity, fill_value=0)
  slot_ok = jnp.arange(setup.capacity) < count
  flat = acts.reshape(-1, acts.shape[-1])[idx]
  transcoder = {}
  if target:
    y = clean.acts[target]
    transcoder = dict(target_BTD=y, flat_target_CD=y.reshape(-1, y.shape[-1])[idx])
    if mid_sites:
      transcoder["resid_mid_BTD"] = clean.acts[mid_sites[0]] + clean.acts[mid_sites[1]]
  return Batch(**transcoder,acts_BTD=acts, mask_BT=mask, flat_CD=flat, flat_mask_C=slot_ok,
               dropped=jnp.maximum(count - setup.capacity, 0),
               clean_logits=clean.logits,
               clean_logp=(losses_lib.clean_log_probs(clean.logits)
                           if any(s.loss.needs_spliced_forward for s in setup.specs) else None),
               clean_downstream={h: clean.acts[h] for h in ds_sites})


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
                  setup: Setup, rng=None, lam_fixed=None, annealed_p=None):
  """Loss and metrics of ONE variant (vmapped over the group). `annealed_p`: p-annealing's
  (order, rescale) at the step, for groups with `SAEConfig.p_anneal`."""
  cfg, lcfg = spec.sae, spec.loss
  if lcfg.needs_sequences:
    # The SAE runs on the tokens flattened to [B·T, D], the layout of the local groups (XLA's
    # CPU backend transposes [B, T, F] code gradients for the encoder's weight gradient).
    b, t, d = batch.acts_BTD.shape
    mask = batch.mask_BT.reshape(b * t)
    inputs = batch.acts_BTD.reshape(b * t, d)
    if spec.target_site:
      # A transcoder's output replaces MLP l's at the selected tokens (the clean MLP output
      # elsewhere); the model resumes at resid_post.l = resid_pre.l + attn_out.l + that output,
      # exactly the sum the model forms there.
      y_ND = batch.target_BTD.reshape(b * t, d)
      x_hat_ND, codes, aux = sae_lib.forward(params, batch.acts_BTD.reshape(b * t, d), cfg,
                                             hparams, state=sae_state, train=True, mask=mask)
      out_ND = sae_lib.to_model_space(x_hat_ND, y_ND, cfg, spec.splice_mode, mask)
      start = f"resid_post.{spec.target_site.partition('.')[2]}"
      start_BTD = batch.resid_mid_BTD + out_ND.reshape(b, t, d)
    else:
      out_ND, codes, aux = sae_lib.splice(params, batch.acts_BTD.reshape(b * t, d), cfg,
                                          hparams, spec.splice_mode, mask=mask, state=sae_state,
                                          train=True)
      start = setup.site
      start_BTD = out_ND.reshape(b, t, d)
    out = out_ND.reshape(b, t, d)
    extra = {}
    spliced_logits = None
    if lcfg.needs_spliced_forward:
      ds = lcfg.downstream_sites(setup.model_config, setup.site) if lcfg.needs_downstream else ()
      res = model_lib.apply_from(lm_params, start, start_BTD, setup.model_config, collect=ds)
      spliced_logits = res.logits
      flat = lambda v: v.reshape(b * t, v.shape[-1])
      extra = dict(clean_logp=flat(batch.clean_logp), spliced_logits=flat(res.logits))
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
    inputs = batch.flat_CD
    _, codes, aux = sae_lib.forward(params, batch.flat_CD, cfg, hparams, state=sae_state,
                                    train=True, mask=mask)
    extra = {}
  x_hat = aux["x_hat"]
  # What x̂ stands for: the SAE's (possibly normalised) input, or a transcoder's target.
  if not spec.target_site:
    target = aux["target"]
  elif lcfg.needs_sequences:
    target = batch.target_BTD.reshape(x_hat.shape)
  else:
    target = batch.flat_target_CD
  active = aux.get("active")
  if cfg.activation == "jumprelu":
    sparse_codes = aux["gates"]
  elif cfg.activation == "gated":
    sparse_codes = sae_lib.gated_sparsity_codes(params, aux["gate_acts"], cfg)
    extra["gate_x_hat"] = sae_lib.gated_aux_reconstruction(params, aux["gate_acts"], cfg)
  elif active is not None and active.tok is None:
    sparse_codes = active.vals.T  # [tokens, k_max]: the same per-token norms as the codes
  else:
    sparse_codes = codes
  w = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1)
  fires_F = (metrics_lib.latent_fire_counts(codes, w) if active is None
             else active_codes.fire_counts(active, w))
  new_state = aux["state"]
  if cfg.k_aux:
    # AuxK: the latents dead before this step reconstruct its residual; then the counters move.
    dead_F = sae_lib.dead_latents(sae_state, hparams)
    aux_codes = activations.auxk_codes(aux["pre_acts"], dead_F, cfg.k_aux)
    extra["auxk"] = losses_lib.auxk(aux_codes, sae_lib.dictionary(params, cfg), x_hat,
                                    target, mask)
  if cfg.tracks_firing:
    new_state = sae_lib.update_since_fired(new_state, fires_F > 0,
                                           jnp.sum(mask.astype(jnp.int32)))
  if cfg.matryoshka:
    extra["prefix_x_hats"] = {m: sae_lib.decode_prefix(params, codes, cfg, m)
                              for m in cfg.matryoshka}
  if cfg.p_anneal:
    extra["annealed_p"], extra["annealed_rescale"] = annealed_p
  terms = losses_lib.compute_terms(lcfg, d_in=cfg.d_in, codes=sparse_codes, x_hat=x_hat,
                                   target=target, mask=mask, **extra)
  total, terms = losses_lib.total_loss(terms, coeffs)
  # e2e_sae's explained variance: the token mean of 1 − Σ_d (x̂−x)² / Σ_d (x − mean_tokens x)².
  mean_D = jnp.sum(w[:, None] * target, axis=0) / n
  metrics = dict(terms)
  metrics["loss"] = total
  metrics["l0"] = jnp.sum(fires_F) / n
  metrics["explained_variance"] = jnp.sum(
      w * metrics_lib.token_explained_variance(x_hat, target, mean_D)) / n
  if cfg.k_aux:
    metrics["auxk_dead_fraction"] = jnp.mean(dead_F.astype(jnp.float32))
  if cfg.p_anneal:
    metrics["sparsity_p"] = annealed_p[0]
  resample_in = None
  if cfg.resample_steps:  # the step's inputs and their squared errors (masked out: 0)
    sq_err = jnp.where(mask, jnp.sum(jnp.square(x_hat - target), axis=-1), 0.0)
    resample_in = (inputs, jax.lax.stop_gradient(sq_err))
  return total, (metrics, new_state, fires_F > 0, resample_in)


def _group_step(state: GroupState, hyper: GroupHyper, batch: Batch, lm_params, step,
                spec: GroupSpec, setup: Setup):
  """One optimizer step for every variant of a group."""
  grad_fn = jax.value_and_grad(_variant_loss, has_aux=True)
  tx = _optimizer(setup)
  lr_factor = schedule_factor(step, setup)

  def one(params, opt_state, sae_state, frozen, bad_step, hparams, coeffs, lr, seed, causal,
          p_anneal):
    started = step >= causal.start
    if spec.loss.causal:
      # β follows its ramp; a fresh Adam state at the start of the fine-tuning phase.
      coeffs = coeffs.replace(
          causal=coeffs.causal * losses_lib.causal_ramp(step, causal.start, causal.ramp))
      reset = causal.reset_opt & (causal.start > 0) & (step == causal.start)
      fresh = tx.init(params)
      opt_state = jax.tree.map(lambda f, o: jnp.where(reset, f, o), fresh, opt_state)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _CAUSAL_STREAM)
    annealed_p = (None if p_anneal is None else
                  (losses_lib.anneal_p(step, p_anneal.p_end, p_anneal.start, p_anneal.steps),
                   p_anneal.rescale))
    (loss, (metrics, new_sae_state, fired, resample_in)), grads = grad_fn(
        params, sae_state, hparams, coeffs, batch, lm_params, spec, setup, rng,
        causal.lambda_value, annealed_p)
    grads = sae_lib.project_gradients(params, grads, spec.sae)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, opt_state, params)
    if "log_threshold" in updates and hparams.jumprelu_threshold_lr_scale is not None:
      updates = dict(updates, log_threshold=updates["log_threshold"]
                     * hparams.jumprelu_threshold_lr_scale)
    lr_t = lr * lr_factor * jnp.where(started, causal.lr_scale, 1.0)
    new_params = jax.tree.map(lambda p, u: p - lr_t * u, params, updates)
    new_params = sae_lib.renormalize(new_params, spec.sae)
    ok = finite & ~frozen
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    metrics = dict(metrics, grad_norm=grad_norm, lr=lr_t)
    if spec.loss.causal:
      metrics["causal_beta"] = coeffs.causal
    kept = (keep(new_params, params), keep(new_opt, opt_state), keep(new_sae_state, sae_state))
    if spec.sae.resample_steps:
      # After the update of each resample step, the dead latents are re-initialised.
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _RESAMPLE_STREAM)
      at = jnp.any(step + 1 == jnp.asarray(spec.sae.resample_steps, jnp.int32))
      *kept, n_resampled = jax.lax.cond(
          at, lambda a: resample_lib.resample(key, *a, hparams, *resample_in, ok, spec.sae),
          lambda a: (*a, jnp.zeros((), jnp.int32)), kept)
      metrics["resampled"] = n_resampled.astype(jnp.float32)
    return (*kept, frozen | ~finite, jnp.where((bad_step < 0) & ~finite, step, bad_step), metrics,
            fired & ok)

  out = variant_axis.over_variants(one, setup.variant_loop)(
      state.params, state.opt_state, state.sae_state, state.frozen, state.bad_step,
      hyper.hparams, hyper.coeffs, hyper.lr, hyper.seed, hyper.causal, hyper.p_anneal)
  params, opt_state, sae_state, frozen, bad_step, metrics, fired = out
  return GroupState(params, opt_state, sae_state, frozen, bad_step), metrics, fired


_CAUSAL_STREAM = 7  # folded into (variant seed, step) for the causal term's λ draws
_RESAMPLE_STREAM = 11  # ... and for the resampled latents' input draws


def resolve_variant_loop(choice: str, mesh) -> str:
  """'auto': 'map' on a CPU backend with one device on the variant axis, else 'vmap'."""
  if choice not in variant_axis.VARIANT_LOOPS:
    raise ValueError(f"config.variant_loop={choice!r}: use one of "
                     f"{variant_axis.VARIANT_LOOPS}")
  if choice != "auto":
    return choice
  cpu = jax.default_backend() == "cpu"
  return "map" if cpu and mesh.shape["variant"] == 1 else "vmap"


def train_chunk(state: GridState, hypers: tuple[GroupHyper, ...], lm_params, data_key,
                *, setup: Setup, num_steps: int):
  """`num_steps` steps in one `lax.scan`; returns the new state and per-group metrics
  (mean over the steps) with the dead-latent fraction over the chunk's tokens, and
  `first_step_loss`, the loss of the chunk's first step (before its update: at a run's start,
  the initial loss that divergence is measured against)."""
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
    mean["first_step_loss"] = m["loss"][0]
    summary.append(mean)
  return state, tuple(summary)

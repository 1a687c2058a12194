"""Latent interventions through a spliced SAE and their outcomes.

An `Intervention` edits the SAE codes at its site before they are decoded back into the model:

    clamp      selected latents := value (a number, or per latent [F], e.g. a quantile from
               `latent_quantiles`);
    zero       selected latents := 0 (zero ablation);
    keep_only  every latent NOT selected := 0;
    patch      selected latents := the codes of a source input at the same positions (the source
               is given as tokens, run through the clean LM and the same SAE, or as codes).

Latents are one int index or a bool mask over F; the edit applies at the positions of a bool
`[B, T]` mask, or at every position (a scalar True). The edited codes are decoded with the SAE's
own decoder (`sae.decode`: dictionary norm, biases, `recon_norm`) and spliced exactly as
`sae.splice` splices the plain reconstruction: in `corrected` mode the input is normalised under
`input_norm` and, under `input_norm` or `recon_norm`, the output is rescaled to ‖x‖; in `original`
mode raw x goes in and the raw output comes out. With nothing edited (or `intervention=None`) the
replacement IS the plain splice. `intervened_logits` runs the model with that replacement (jitted;
the intervention's kind is static, everything else dynamic); `intervened_logits_latents` /
`intervened_logits_variants` vmap it over latents (indices or masks, with values) and over the
stacked variants of a group.

Outcomes are reported against both baselines, the clean model and the plain SAE-spliced model:
KL(base ‖ intervened) of the next-token distribution and the shift of the probability of token
classes (`grammars.token_classes`: Dyck `<eos>`, openers, closers per type; Expr `<eos>`, digits, operators
by arity; English `<eos>` and each part of speech), as means over the measured positions; and
statistics of generations under the intervention (`generation_stats`: exact grammaticality,
length, class counts, Dyck depth), compiled once per static structure with the SAE params and the
intervention as arguments.

Causal predictability (do label-correlated latents act as their labels predict when clamped?)
is built on these functions in `causality.py`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import grammars
from jaxsae.grammars import token_classes as token_classes_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import model as model_lib

KINDS = ("clamp", "zero", "keep_only", "patch")


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


# ------------------------------------------------------------------------------------------------
# The intervention pytree.


@flax.struct.dataclass
class Intervention:
  """An edit of SAE codes (see the module docstring); build it with `clamp`, `zero`, ...

  Attributes:
    kind: static, one of `KINDS`.
    latents: int32 [] (one latent index) or bool [F] (a mask of latents).
    value: float32 [] or [F]: the clamp value(s) (unused by other kinds).
    positions: bool [B, T] (where the edit applies) or a scalar bool True (everywhere).
    source: `patch` only: int tokens [B, T] (encoded by the clean LM + the SAE) or float codes
      [B, T, F] of the source input; None otherwise.
  """

  latents: jax.Array
  value: jax.Array
  positions: jax.Array
  source: jax.Array | None = None
  kind: str = flax.struct.field(pytree_node=False, default="clamp")

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Intervention.kind={self.kind!r} is unknown; choose one of "
                       f"{', '.join(KINDS)}.")


def _latents(latents) -> jax.Array:
  a = jnp.asarray(latents)
  return a.astype(jnp.int32) if jnp.issubdtype(a.dtype, jnp.integer) else a


def _positions(positions) -> jax.Array:
  return jnp.asarray(True) if positions is None else jnp.asarray(positions, bool)


def clamp(latents, value, positions=None) -> Intervention:
  """Clamps `latents` (index or bool mask [F]) to `value` ([] or [F]) at `positions` ([B, T])."""
  return Intervention(kind="clamp", latents=_latents(latents),
                      value=jnp.asarray(value, jnp.float32), positions=_positions(positions))


def zero(latents, positions=None) -> Intervention:
  """Zero-ablates `latents` at `positions` (default everywhere)."""
  return Intervention(kind="zero", latents=_latents(latents), value=jnp.zeros((), jnp.float32),
                      positions=_positions(positions))


def keep_only(latents, positions=None) -> Intervention:
  """Zeroes every latent except `latents` at `positions`."""
  return Intervention(kind="keep_only", latents=_latents(latents),
                      value=jnp.zeros((), jnp.float32), positions=_positions(positions))


def patch(latents, source, positions=None) -> Intervention:
  """Sets `latents` to the source input's codes at the same positions.

  Args:
    latents: index or bool mask [F].
    source: int tokens [B, T] of the source input (the same shape as the target tokens), or
      float codes [B, T, F].
    positions: bool [B, T]; default everywhere.
  """
  source = jnp.asarray(source)
  source = source.astype(jnp.int32) if jnp.issubdtype(source.dtype, jnp.integer) else \
      source.astype(jnp.float32)
  return Intervention(kind="patch", latents=_latents(latents), value=jnp.zeros((), jnp.float32),
                      positions=_positions(positions), source=source)


def latent_mask(indices: Sequence[int], width: int) -> jax.Array:
  """bool [F] mask with True at `indices` (for interventions on several latents at once)."""
  idx = np.asarray(indices, np.int64).reshape(-1)
  if idx.size and (idx.min() < 0 or idx.max() >= width):
    raise ValueError(f"latent indices {idx.tolist()} must lie in [0, width={width}).")
  return jnp.zeros((width,), bool).at[jnp.asarray(idx, jnp.int32)].set(True)


def check_intervention(intervention: Intervention, width: int,
                       tokens_shape: tuple[int, ...] | None = None) -> None:
  """Validates shapes and (when concrete) latent indices; raises ValueError naming the fix."""
  if not isinstance(intervention, Intervention):
    raise ValueError(f"expected an Intervention (build one with interventions.clamp / zero / "
                     f"keep_only / patch), got {type(intervention).__name__}.")
  lat = intervention.latents
  if lat.ndim == 0:
    if not jnp.issubdtype(lat.dtype, jnp.integer):
      raise ValueError(f"Intervention.latents must be an int index or a bool mask [{width}], "
                       f"got dtype {lat.dtype}.")
    if not _is_tracer(lat) and not 0 <= int(lat) < width:
      raise ValueError(f"Intervention.latents={int(lat)} is out of range for an SAE of width "
                       f"{width}; use an index in [0, {width}).")
  elif lat.shape != (width,) or lat.dtype != jnp.bool_:
    raise ValueError(f"Intervention.latents has shape {lat.shape} and dtype {lat.dtype}; it must "
                     f"be a bool mask [{width}] (the SAE width; see latent_mask), or a scalar "
                     f"int index.")
  if intervention.value.shape not in ((), (width,)):
    raise ValueError(f"Intervention.value has shape {intervention.value.shape}; use a scalar or "
                     f"one value per latent [{width}].")
  pos = intervention.positions
  if pos.ndim and tokens_shape is not None and pos.shape != tuple(tokens_shape):
    raise ValueError(f"Intervention.positions has shape {pos.shape} but the tokens are "
                     f"{tuple(tokens_shape)}; pass a bool mask of the tokens' shape, or None for "
                     f"every position.")
  src = intervention.source
  if intervention.kind == "patch":
    if src is None:
      raise ValueError("a 'patch' intervention needs a source (tokens [B, T] or codes "
                       "[B, T, F]); build it with interventions.patch(latents, source).")
    want = None if tokens_shape is None else (tuple(tokens_shape) if jnp.issubdtype(
        src.dtype, jnp.integer) else (*tokens_shape, width))
    if want is not None and src.shape != want:
      raise ValueError(f"patch source has shape {src.shape}; it must be {want} (tokens aligned "
                       f"with the target, or their codes).")
  elif src is not None:
    raise ValueError(f"Intervention.source is only used by 'patch', got one for "
                     f"{intervention.kind!r}; leave it None.")


def edit_codes(codes: jax.Array, intervention: Intervention,
               source_codes: jax.Array | None = None) -> jax.Array:
  """Applies the intervention to codes `[..., F]` (positions broadcast to `codes.shape[:-1]`).

  Args:
    codes: SAE codes.
    intervention: the edit.
    source_codes: codes of the source input (same shape as `codes`), for `patch`.

  Returns:
    The edited codes, equal to `codes` wherever the intervention does not apply.
  """
  f = codes.shape[-1]
  lat = intervention.latents
  sel_F = jax.nn.one_hot(lat, f, dtype=bool) if lat.ndim == 0 else lat.astype(bool)
  kind = intervention.kind
  if kind == "keep_only":
    sel_F = ~sel_F
  if kind == "clamp":
    new = jnp.broadcast_to(intervention.value.astype(codes.dtype), (f,))
    new = jnp.broadcast_to(new.reshape((1,) * (codes.ndim - 1) + (f,)), codes.shape)
  elif kind == "patch":
    if source_codes is None:
      raise ValueError("a 'patch' edit needs source_codes of the codes' shape.")
    new = jnp.broadcast_to(source_codes.astype(codes.dtype), codes.shape)
  else:
    new = jnp.zeros_like(codes)
  pos = jnp.broadcast_to(intervention.positions, codes.shape[:-1])
  where = pos[..., None] & sel_F.reshape((1,) * (codes.ndim - 1) + (f,))
  return jnp.where(where, new, codes)


# ------------------------------------------------------------------------------------------------
# Splicing the edited codes, and the logits.


def _splice_edited(sae_params, x, sae_config, hparams, sae_state, splice_mode, intervention,
                   source_codes, splice_mask):
  """`sae.splice` with the codes edited before decoding (the plain splice if nothing edits)."""
  out, codes, _ = sae_lib.splice(sae_params, x, sae_config, hparams, mode=splice_mode,
                                 state=sae_state)
  if intervention is not None:
    x_hat = sae_lib.decode(sae_params, edit_codes(codes, intervention, source_codes), sae_config)
    out = sae_lib.to_model_space(x_hat, x, sae_config, splice_mode)
  if splice_mask is not None:
    out = jnp.where(jnp.broadcast_to(splice_mask, x.shape[:-1])[..., None], out, x)
  return out


def _site_codes(lm_params, sae_params, hparams, sae_state, tokens_BT, model_config, site,
                sae_config, splice_mode):
  acts = model_lib.apply(lm_params, tokens_BT, model_config, stop_at=site).acts[site]
  return sae_lib.splice(sae_params, acts, sae_config, hparams, mode=splice_mode,
                        state=sae_state)[1]


def _logits_impl(lm_params, sae_params, hparams, sae_state, tokens_BT, intervention, splice_mask,
                 model_config, site, sae_config, splice_mode):
  source_codes = None
  if intervention is not None and intervention.kind == "patch":
    src = intervention.source
    source_codes = (_site_codes(lm_params, sae_params, hparams, sae_state, src, model_config,
                                site, sae_config, splice_mode)
                    if jnp.issubdtype(src.dtype, jnp.integer) else src)
  fn = lambda x: _splice_edited(sae_params, x, sae_config, hparams, sae_state, splice_mode,
                                intervention, source_codes, splice_mask)
  return model_lib.apply(lm_params, tokens_BT, model_config, replace={site: fn}).logits


_STATIC = ("model_config", "site", "sae_config", "splice_mode")
_logits_jit = jax.jit(_logits_impl, static_argnames=_STATIC)


def _check_common(model_config, site, sae_config, splice_mode, tokens_BT):
  names = model_lib.site_names(model_config)
  if site not in names:
    raise ValueError(f"site={site!r} is not a site of the model; valid sites: {', '.join(names)}.")
  if sae_config.d_in != model_config.d_model:
    raise ValueError(f"the SAE's d_in={sae_config.d_in} differs from the model's d_model="
                     f"{model_config.d_model}; use the SAE trained at this model's site.")
  if splice_mode not in sae_lib.SPLICE_MODES:
    raise ValueError(f"splice_mode={splice_mode!r} is unknown; choose one of "
                     f"{', '.join(sae_lib.SPLICE_MODES)}.")
  if tokens_BT is not None and jnp.ndim(tokens_BT) != 2:
    raise ValueError(f"tokens must be [B, T], got shape {jnp.shape(tokens_BT)}.")


def intervened_logits(lm_params: model_lib.Params, model_config: model_lib.ModelConfig,
                      site: str, sae_params: sae_lib.Params, sae_config: sae_lib.SAEConfig,
                      hparams: sae_lib.SAEHparams, tokens_BT: jax.Array,
                      intervention: Intervention | None, splice_mode: str = "corrected",
                      sae_state: sae_lib.SAEState | None = None, *,
                      splice_mask_BT: jax.Array | None = None) -> jax.Array:
  """Next-token logits `[B, T, V]` with the SAE spliced at `site` and its codes edited.

  Args:
    lm_params, model_config: the frozen LM.
    site: the SAE's site.
    sae_params, sae_config, hparams, sae_state: one SAE variant (inference mode).
    tokens_BT: int tokens.
    intervention: the edit, or None for the plain SAE splice.
    splice_mode: as `sae.splice`.
    splice_mask_BT: optional bool: the SAE replaces the activation only there (others clean).

  Returns:
    float32 logits `[B, T, V]`.
  """
  _check_common(model_config, site, sae_config, splice_mode, tokens_BT)
  if intervention is not None:
    check_intervention(intervention, sae_config.width, jnp.shape(tokens_BT))
  return _logits_jit(lm_params, sae_params, hparams, sae_state, jnp.asarray(tokens_BT),
                     intervention, splice_mask_BT, model_config=model_config, site=site,
                     sae_config=sae_config, splice_mode=splice_mode)


def _with_latents(intervention, lat, val):
  return intervention.replace(latents=lat, value=val)


def _check_sweep(intervention, latents_L, values_L, width, tokens_shape):
  latents_L = jnp.asarray(latents_L)
  if latents_L.ndim == 1 and jnp.issubdtype(latents_L.dtype, jnp.integer):
    if not _is_tracer(latents_L) and latents_L.size and not (
        0 <= int(latents_L.min()) and int(latents_L.max()) < width):
      raise ValueError(f"latents_L must lie in [0, {width}), got {np.asarray(latents_L).tolist()}.")
    latents_L = latents_L.astype(jnp.int32)
  elif latents_L.ndim == 2 and latents_L.shape[1] == width:
    latents_L = latents_L.astype(bool)
  else:
    raise ValueError(f"latents_L must be int indices [L] or bool masks [L, {width}], got shape "
                     f"{latents_L.shape}.")
  n = latents_L.shape[0]
  if values_L is None:
    values_L = jnp.broadcast_to(intervention.value, (n, *intervention.value.shape))
  values_L = jnp.asarray(values_L, jnp.float32)
  if values_L.shape not in ((n,), (n, width)):
    raise ValueError(f"values_L has shape {values_L.shape}; use [L={n}] or [L, {width}].")
  check_intervention(_with_latents(intervention, latents_L[0] if n else jnp.int32(0),
                                   values_L[0] if n else jnp.float32(0)), width, tokens_shape)
  return latents_L, values_L


@functools.partial(jax.jit, static_argnames=_STATIC)
def _latents_jit(lm_params, sae_params, hparams, sae_state, tokens_BT, intervention, latents_L,
                 values_L, splice_mask, model_config, site, sae_config, splice_mode):
  def one(lat, val):
    return _logits_impl(lm_params, sae_params, hparams, sae_state, tokens_BT,
                        _with_latents(intervention, lat, val), splice_mask, model_config, site,
                        sae_config, splice_mode)
  return jax.vmap(one)(latents_L, values_L)


def intervened_logits_latents(lm_params: model_lib.Params, model_config: model_lib.ModelConfig,
                              site: str, sae_params: sae_lib.Params,
                              sae_config: sae_lib.SAEConfig, hparams: sae_lib.SAEHparams,
                              tokens_BT: jax.Array, intervention: Intervention,
                              latents_L: jax.Array, values_L: jax.Array | None = None,
                              splice_mode: str = "corrected",
                              sae_state: sae_lib.SAEState | None = None, *,
                              splice_mask_BT: jax.Array | None = None) -> jax.Array:
  """`intervened_logits` vmapped over latents: logits `[L, B, T, V]`.

  Args:
    intervention: the template (kind, positions, source); its latents and value are replaced
      by `latents_L[i]`, `values_L[i]` for item i.
    latents_L: int indices [L] or bool masks [L, F].
    values_L: float [L] or [L, F] clamp values (default: the template's value for all).
    Others: as `intervened_logits`.
  """
  _check_common(model_config, site, sae_config, splice_mode, tokens_BT)
  latents_L, values_L = _check_sweep(intervention, latents_L, values_L, sae_config.width,
                                     jnp.shape(tokens_BT))
  return _latents_jit(lm_params, sae_params, hparams, sae_state, jnp.asarray(tokens_BT),
                      intervention, latents_L, values_L, splice_mask_BT,
                      model_config=model_config, site=site, sae_config=sae_config,
                      splice_mode=splice_mode)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "per_variant"))
def _variants_jit(lm_params, sae_params_N, hparams_N, sae_state_N, tokens_BT, intervention,
                  splice_mask, model_config, site, sae_config, splice_mode, per_variant):
  def one(p, h, s, lat, val):
    iv = None if intervention is None else _with_latents(intervention, lat, val)
    return _logits_impl(lm_params, p, h, s, tokens_BT, iv, splice_mask, model_config, site,
                        sae_config, splice_mode)
  lat = None if intervention is None else intervention.latents
  val = None if intervention is None else intervention.value
  axis = 0 if per_variant else None
  return jax.vmap(one, in_axes=(0, 0, 0, axis, axis))(sae_params_N, hparams_N, sae_state_N, lat,
                                                      val)


def intervened_logits_variants(lm_params: model_lib.Params, model_config: model_lib.ModelConfig,
                               site: str, sae_params_N: sae_lib.Params,
                               sae_config: sae_lib.SAEConfig, hparams_N: sae_lib.SAEHparams,
                               tokens_BT: jax.Array, intervention: Intervention | None,
                               splice_mode: str = "corrected",
                               sae_state_N: sae_lib.SAEState | None = None, *,
                               per_variant: bool = False,
                               splice_mask_BT: jax.Array | None = None) -> jax.Array:
  """`intervened_logits` vmapped over the N stacked variants of a group: logits `[N, B, T, V]`.

  Args:
    sae_params_N, hparams_N, sae_state_N: stacked on a leading variant axis (state may be None).
    intervention: shared by all variants, or (per_variant=True) with `latents` and `value`
      stacked on a leading N axis (positions and source shared), e.g. per-variant quantiles.
    Others: as `intervened_logits`.
  """
  _check_common(model_config, site, sae_config, splice_mode, tokens_BT)
  n = jax.tree.leaves(sae_params_N)[0].shape[0]
  if intervention is not None:
    if per_variant:
      if intervention.latents.shape[:1] != (n,) or intervention.value.shape[:1] != (n,):
        raise ValueError(f"per_variant=True needs latents and value stacked on a leading axis "
                         f"of the {n} variants, got {intervention.latents.shape} and "
                         f"{intervention.value.shape}.")
      for i in range(n):
        check_intervention(_with_latents(intervention, intervention.latents[i],
                                         intervention.value[i]), sae_config.width,
                           jnp.shape(tokens_BT))
    else:
      check_intervention(intervention, sae_config.width, jnp.shape(tokens_BT))
  return _variants_jit(lm_params, sae_params_N, hparams_N, sae_state_N, jnp.asarray(tokens_BT),
                       intervention, splice_mask_BT, model_config=model_config, site=site,
                       sae_config=sae_config, splice_mode=splice_mode,
                       per_variant=bool(per_variant) and intervention is not None)


# ------------------------------------------------------------------------------------------------
# Codes on data, and their quantiles.


def site_codes(lm_params: model_lib.Params, model_config: model_lib.ModelConfig, site: str,
               sae_params: sae_lib.Params, sae_config: sae_lib.SAEConfig,
               hparams: sae_lib.SAEHparams, tokens_BT: jax.Array,
               splice_mode: str = "corrected",
               sae_state: sae_lib.SAEState | None = None) -> jax.Array:
  """The SAE's codes `[B, T, F]` of the clean activations at `site` (as the splice encodes)."""
  _check_common(model_config, site, sae_config, splice_mode, tokens_BT)
  return _site_codes_jit(lm_params, sae_params, hparams, sae_state, jnp.asarray(tokens_BT),
                         model_config=model_config, site=site, sae_config=sae_config,
                         splice_mode=splice_mode)


_site_codes_jit = jax.jit(_site_codes, static_argnames=_STATIC)


def latent_quantiles(codes_MF: jax.Array, qs: Sequence[float] | jax.Array, *,
                     mask_M: jax.Array | None = None, active_only: bool = True) -> jax.Array:
  """Per-latent quantiles `[Q, F]` of observed codes (linear interpolation).

  Args:
    codes_MF: codes of M tokens.
    qs: quantile levels in [0, 1].
    mask_M: optional bool, the tokens that count (default all).
    active_only: quantiles over the tokens where the latent fires (code != 0): "its range when
      active", what a clamp to a typical high value wants; a latent that never fires gets 0.
      False: over all counted tokens (mostly zeros for a sparse latent).
  """
  qs = jnp.asarray(qs, jnp.float32)
  if qs.ndim != 1 or not _is_tracer(qs) and not bool(jnp.all((qs >= 0) & (qs <= 1))):
    raise ValueError(f"qs must be a list of quantile levels in [0, 1], got {np.asarray(qs)}.")
  if jnp.ndim(codes_MF) != 2:
    raise ValueError(f"codes_MF must be [M, F], got shape {jnp.shape(codes_MF)}; flatten the "
                     f"token axes first.")
  codes_MF = jnp.asarray(codes_MF, jnp.float32)
  keep_MF = jnp.ones(codes_MF.shape, bool)
  if mask_M is not None:
    keep_MF = keep_MF & jnp.asarray(mask_M, bool)[:, None]
  if active_only:
    keep_MF = keep_MF & (codes_MF != 0)
  vals = jnp.nanquantile(jnp.where(keep_MF, codes_MF, jnp.nan), qs, axis=0)
  return jnp.where(jnp.isnan(vals), 0.0, vals)


# ------------------------------------------------------------------------------------------------
# Outcome measures.


def effect_measures(base_logits_BTV: jax.Array, edited_logits_BTV: jax.Array,
                    mask_BT: jax.Array, membership_CV: jax.Array) -> dict[str, jax.Array]:
  """How an edit moves the next-token distribution, as means over the masked positions.

  Returns:
    dict with `kl` (KL(base ‖ edited), nats), `class_base` [C] and `class_edited` [C] (mean
    probability of each class), `class_shift` [C] = class_edited − class_base, and `top1_change`
    (fraction of positions whose argmax changes).
  """
  logp_b = jax.nn.log_softmax(base_logits_BTV.astype(jnp.float32), axis=-1)
  logp_e = jax.nn.log_softmax(edited_logits_BTV.astype(jnp.float32), axis=-1)
  p_b, p_e = jnp.exp(logp_b), jnp.exp(logp_e)
  w_BT = jnp.asarray(mask_BT, jnp.float32)
  n = jnp.maximum(jnp.sum(w_BT), 1.0)
  kl_BT = jnp.sum(p_b * (logp_b - logp_e), axis=-1)
  member = jnp.asarray(membership_CV, jnp.float32)
  cls_b = jnp.einsum("bt,btv,cv->c", w_BT, p_b, member) / n
  cls_e = jnp.einsum("bt,btv,cv->c", w_BT, p_e, member) / n
  flip_BT = (jnp.argmax(logp_b, -1) != jnp.argmax(logp_e, -1)).astype(jnp.float32)
  return {"kl": jnp.sum(w_BT * kl_BT) / n, "class_base": cls_b, "class_edited": cls_e,
          "class_shift": cls_e - cls_b, "top1_change": jnp.sum(w_BT * flip_BT) / n}


def _effects_impl(lm_params, sae_params, hparams, sae_state, tokens_BT, mask_BT, membership,
                  intervention, latents_L, values_L, chunk, model_config, site, sae_config,
                  splice_mode):
  clean = model_lib.apply(lm_params, tokens_BT, model_config).logits
  spliced = _logits_impl(lm_params, sae_params, hparams, sae_state, tokens_BT, None, None,
                         model_config, site, sae_config, splice_mode)

  def one(lat_val):
    iv = intervention if latents_L is None else _with_latents(intervention, *lat_val)
    edited = _logits_impl(lm_params, sae_params, hparams, sae_state, tokens_BT, iv, None,
                          model_config, site, sae_config, splice_mode)
    return {"vs_clean": effect_measures(clean, edited, mask_BT, membership),
            "vs_spliced": effect_measures(spliced, edited, mask_BT, membership)}

  out = (one(None) if latents_L is None
         else jax.lax.map(one, (latents_L, values_L), batch_size=chunk))
  out["spliced_vs_clean"] = effect_measures(clean, spliced, mask_BT, membership)
  return out


_effects_jit = jax.jit(_effects_impl, static_argnames=(*_STATIC, "chunk"))


def intervention_effects(lm_params: model_lib.Params, model_config: model_lib.ModelConfig,
                         site: str, sae_params: sae_lib.Params, sae_config: sae_lib.SAEConfig,
                         hparams: sae_lib.SAEHparams, tokens_BT: jax.Array,
                         intervention: Intervention, mask_BT: jax.Array,
                         membership_CV: jax.Array, splice_mode: str = "corrected",
                         sae_state: sae_lib.SAEState | None = None, *,
                         latents_L: jax.Array | None = None, values_L: jax.Array | None = None,
                         chunk: int = 8) -> dict[str, Any]:
  """`effect_measures` of an intervention against the clean and the plain spliced model.

  Args:
    mask_BT: bool, the positions measured (e.g. the sentence positions, or the intervened ones).
    membership_CV: from `grammars.token_classes.token_classes`.
    latents_L, values_L: optional: sweep the template over latents as
      `intervened_logits_latents` (lax.map in chunks of `chunk` latents, bounding memory).
    Others: as `intervened_logits`.

  Returns:
    `{'vs_clean': ..., 'vs_spliced': ..., 'spliced_vs_clean': ...}`, each an `effect_measures`
    dict (with a leading L axis for a sweep, except `spliced_vs_clean`).
  """
  _check_common(model_config, site, sae_config, splice_mode, tokens_BT)
  tokens_BT = jnp.asarray(tokens_BT)
  if jnp.shape(mask_BT) != tokens_BT.shape:
    raise ValueError(f"mask_BT has shape {jnp.shape(mask_BT)}; it must match the tokens "
                     f"{tokens_BT.shape}.")
  membership_CV = jnp.asarray(membership_CV)
  if membership_CV.ndim != 2 or membership_CV.shape[1] != model_config.vocab_size:
    raise ValueError(f"membership_CV must be [C, V={model_config.vocab_size}] (from "
                     f"grammars.token_classes.token_classes), got {membership_CV.shape}.")
  if not (isinstance(chunk, int) and chunk > 0):
    raise ValueError(f"chunk must be a positive int, got {chunk!r}.")
  if latents_L is None:
    check_intervention(intervention, sae_config.width, tokens_BT.shape)
  else:
    latents_L, values_L = _check_sweep(intervention, latents_L, values_L, sae_config.width,
                                       tokens_BT.shape)
  return _effects_jit(lm_params, sae_params, hparams, sae_state, tokens_BT,
                      jnp.asarray(mask_BT, bool), membership_CV, intervention, latents_L,
                      values_L, chunk=chunk, model_config=model_config, site=site,
                      sae_config=sae_config, splice_mode=splice_mode)


# ------------------------------------------------------------------------------------------------
# Generation under an intervention.


def _generate_impl(lm_params, sae_params, hparams, sae_state, intervention, key, temperature,
                   grammar, model_config, site, sae_config, splice_mode, batch_size,
                   max_new_tokens, include_prompt):
  def fn(x):
    # The prompt reaches the replacement as one chunk of 7 positions, each new token as 1.
    iv = intervention if include_prompt or x.shape[-2] == 1 else None
    return _splice_edited(sae_params, x, sae_config, hparams, sae_state, splice_mode, iv, None,
                          None)
  return generate_lib.generate(lm_params, model_config, grammar, key, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               replace={site: fn})


_generate_jit = jax.jit(_generate_impl, static_argnames=(
    *_STATIC, "batch_size", "max_new_tokens", "include_prompt"))


def generation_stats(lm_params: model_lib.Params, model_config: model_lib.ModelConfig,
                     grammar: grammars.Grammar, site: str, sae_params: sae_lib.Params,
                     sae_config: sae_lib.SAEConfig, hparams: sae_lib.SAEHparams,
                     key: jax.Array, intervention: Intervention | None = None, *,
                     splice_mode: str = "corrected", sae_state: sae_lib.SAEState | None = None,
                     num_batches: int = 2, batch_size: int = 64,
                     max_new_tokens: int | None = None,
                     temperature: float = 1.0, include_prompt: bool = True,
                     return_tokens: bool = False) -> dict[str, Any]:
  """Statistics of generations with the SAE spliced at `site` and its codes edited.

  Compiles once per static structure (model, site, SAE config, sizes, intervention kind): the
  SAE params, hparams and the intervention's arrays are arguments. Batch i uses
  `fold_in(key, i)`, as `generate.grammaticality`, so `intervention=None` reproduces its plain
  SAE-spliced numbers.

  Args:
    intervention: applied at every position (its positions must be the scalar "everywhere");
      None: the plain splice. `patch` is not supported here (no aligned source).
    include_prompt: also edit the 7 decorator positions; False edits generated positions only.
    return_tokens: add the generated tokens (int32 [num_batches·B, 7 + max_new_tokens]).
    max_new_tokens: generation budget after the decorator; None (default): the spec's
      `generate.MAX_NEW_TOKENS`, capped to what the model's context leaves after the decorator
      (`min(MAX_NEW_TOKENS, model_config.context - grammar.prefix_len)`, the cap `evaluate`
      and `spliced_generation` apply too).
    Others: as `generate.grammaticality`.

  Returns:
    JSON-able dict: `grammatical` (mean fraction), `grammatical_std` and `per_batch`,
    `finished` (fraction that emitted `<eos>`), `mean_length` (finished sentences),
    `class_counts` (class -> mean count per sentence, <eos> excluded) and `class_fraction`
    (of sentence tokens), and for Dyck `max_depth_mean` / `max_depth_max` (deepest nesting
    of the finished sentences, counting openers +1 and closers −1).
  """
  _check_common(model_config, site, sae_config, splice_mode, None)
  if intervention is not None:
    check_intervention(intervention, sae_config.width)
    if intervention.kind == "patch":
      raise ValueError("generation_stats does not support 'patch' (generations have no aligned "
                       "source); use clamp / zero / keep_only.")
    if intervention.positions.ndim:
      raise ValueError("generation_stats applies the intervention at every generated position; "
                       "build it with positions=None (use include_prompt=False to leave the "
                       "decorator alone).")
  if not (isinstance(num_batches, int) and num_batches > 0):
    raise ValueError(f"num_batches must be a positive int, got {num_batches!r}.")
  if not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if max_new_tokens is None:
    max_new_tokens = min(generate_lib.MAX_NEW_TOKENS, model_config.context - grammar.prefix_len)
  names, member_CV = token_classes_lib.token_classes(grammar)
  recogniser = generate_lib.jitted_for(grammar, grammars.is_grammatical)
  fractions, finished, lengths, all_tokens = [], [], [], []
  for i in range(num_batches):
    gen = _generate_jit(lm_params, sae_params, hparams, sae_state, intervention,
                        jax.random.fold_in(key, i), jnp.float32(temperature), grammar,
                        model_config=model_config, site=site, sae_config=sae_config,
                        splice_mode=splice_mode, batch_size=int(batch_size),
                        max_new_tokens=int(max_new_tokens), include_prompt=bool(include_prompt))
    tokens = np.asarray(gen.tokens)
    padded = np.concatenate([tokens, np.full_like(tokens[:, :1], grammar.pad_id)], axis=1)
    fractions.append(float(np.asarray(recogniser(padded)).mean()))
    finished.append(np.asarray(gen.finished))
    lengths.append(np.asarray(gen.lengths))
    all_tokens.append(tokens)
  tokens = np.concatenate(all_tokens)
  done = np.concatenate(finished)
  length = np.concatenate(lengths)
  new = tokens[:, grammar.prefix_len:]
  in_sent = np.arange(new.shape[1])[None, :] < length[:, None]
  member = member_CV[:, new] & in_sent[None]  # [C, B, N]
  class_counts = member.sum(-1)  # [C, B]
  n_tok = max(int(in_sent.sum()), 1)
  out = {
      "grammatical": float(np.mean(fractions)), "grammatical_std": float(np.std(fractions)),
      "per_batch": fractions, "finished": float(done.mean()),
      "mean_length": float(length[done].mean()) if done.any() else None,
      "class_counts": {c: float(class_counts[j].mean()) for j, c in enumerate(names) if c != "eos"},
      "class_fraction": {c: float(class_counts[j].sum() / n_tok) for j, c in enumerate(names)
                         if c != "eos"},
  }
  if token_classes_lib.family(grammar) == "dyck":
    step = np.where(member_CV[names.index("open")][new], 1,
                    np.where(member_CV[names.index("close")][new], -1, 0)) * in_sent
    depth = np.max(np.concatenate([np.zeros_like(step[:, :1]), np.cumsum(step, 1)], 1), 1)
    out["max_depth_mean"] = float(depth[done].mean()) if done.any() else None
    out["max_depth_max"] = int(depth[done].max()) if done.any() else None
  if return_tokens:
    out["tokens"] = tokens
  return out

"""Latent interventions through a spliced SAE: the edits, and the logits under them.

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

`site_codes` and `latent_quantiles` give the codes on data and typical values to clamp to.

The un-jitted pieces (`splice_edited`, `edited_logits`, the checks `check_site` /
`check_intervention` / `check_sweep`, `with_latents`) are what the outcome modules build on:
`effects.py` (KL and token-class shifts against the clean and the plain spliced model) and
`intervened_generation.py` (statistics of generations under an edit). Causal predictability (do
label-correlated latents act as their labels predict when clamped?) is built on these in
`causality.py`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grid import sae as sae_lib
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


def splice_edited(sae_params, x, sae_config, hparams, sae_state, splice_mode, intervention,
                  source_codes, splice_mask):
  """`sae.splice` with the codes edited before decoding (the plain splice if nothing edits).

  Args:
    sae_params, sae_config, hparams, sae_state: one SAE variant.
    x: the site's activations `[..., D]`.
    splice_mode: as `sae.splice`.
    intervention: the edit, or None.
    source_codes: the source's codes for `patch` (else None).
    splice_mask: optional bool `[...]`: the replacement applies only there (clean elsewhere).

  Returns:
    The replacement activations, the shape of `x`. Traceable (no checks).
  """
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


def edited_logits(lm_params, sae_params, hparams, sae_state, tokens_BT, intervention, splice_mask,
                  model_config, site, sae_config, splice_mode):
  """Un-jitted, unchecked `intervened_logits` (positional; for use inside other jitted code)."""
  source_codes = None
  if intervention is not None and intervention.kind == "patch":
    src = intervention.source
    source_codes = (_site_codes(lm_params, sae_params, hparams, sae_state, src, model_config,
                                site, sae_config, splice_mode)
                    if jnp.issubdtype(src.dtype, jnp.integer) else src)
  fn = lambda x: splice_edited(sae_params, x, sae_config, hparams, sae_state, splice_mode,
                               intervention, source_codes, splice_mask)
  return model_lib.apply(lm_params, tokens_BT, model_config, replace={site: fn}).logits


# The static arguments of every jitted intervention pass (the rest are traced).
STATIC_ARGNAMES = ("model_config", "site", "sae_config", "splice_mode")
_logits_jit = jax.jit(edited_logits, static_argnames=STATIC_ARGNAMES)


def check_site(model_config, site, sae_config, splice_mode, tokens_BT) -> None:
  """Checks the site, the SAE's width against the model, the splice mode and tokens `[B, T]`.

  Args:
    tokens_BT: the tokens, or None to skip their check.

  Raises:
    ValueError: naming the mismatch and the fix.
  """
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
  check_site(model_config, site, sae_config, splice_mode, tokens_BT)
  if intervention is not None:
    check_intervention(intervention, sae_config.width, jnp.shape(tokens_BT))
  return _logits_jit(lm_params, sae_params, hparams, sae_state, jnp.asarray(tokens_BT),
                     intervention, splice_mask_BT, model_config=model_config, site=site,
                     sae_config=sae_config, splice_mode=splice_mode)


def with_latents(intervention: Intervention, lat: jax.Array, val: jax.Array) -> Intervention:
  """The intervention with its latents and value replaced (one item of a sweep)."""
  return intervention.replace(latents=lat, value=val)


def check_sweep(intervention: Intervention, latents_L, values_L, width: int,
                tokens_shape) -> tuple[jax.Array, jax.Array]:
  """Validates a sweep of a template over latents.

  Args:
    intervention: the template.
    latents_L: int indices [L] or bool masks [L, width].
    values_L: float [L] or [L, width], or None (the template's value for all).
    width: the SAE width.
    tokens_shape: the tokens' shape (for the template's positions / source).

  Returns:
    (latents_L as int32 or bool, values_L as float32 with its default filled in).

  Raises:
    ValueError: naming the bad argument and the fix.
  """
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
  check_intervention(with_latents(intervention, latents_L[0] if n else jnp.int32(0),
                                  values_L[0] if n else jnp.float32(0)), width, tokens_shape)
  return latents_L, values_L


@functools.partial(jax.jit, static_argnames=STATIC_ARGNAMES)
def _latents_jit(lm_params, sae_params, hparams, sae_state, tokens_BT, intervention, latents_L,
                 values_L, splice_mask, model_config, site, sae_config, splice_mode):
  def one(lat, val):
    return edited_logits(lm_params, sae_params, hparams, sae_state, tokens_BT,
                         with_latents(intervention, lat, val), splice_mask, model_config, site,
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
  check_site(model_config, site, sae_config, splice_mode, tokens_BT)
  latents_L, values_L = check_sweep(intervention, latents_L, values_L, sae_config.width,
                                    jnp.shape(tokens_BT))
  return _latents_jit(lm_params, sae_params, hparams, sae_state, jnp.asarray(tokens_BT),
                      intervention, latents_L, values_L, splice_mask_BT,
                      model_config=model_config, site=site, sae_config=sae_config,
                      splice_mode=splice_mode)


@functools.partial(jax.jit, static_argnames=(*STATIC_ARGNAMES, "per_variant"))
def _variants_jit(lm_params, sae_params_N, hparams_N, sae_state_N, tokens_BT, intervention,
                  splice_mask, model_config, site, sae_config, splice_mode, per_variant):
  def one(p, h, s, lat, val):
    iv = None if intervention is None else with_latents(intervention, lat, val)
    return edited_logits(lm_params, p, h, s, tokens_BT, iv, splice_mask, model_config, site,
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
  check_site(model_config, site, sae_config, splice_mode, tokens_BT)
  n = jax.tree.leaves(sae_params_N)[0].shape[0]
  if intervention is not None:
    if per_variant:
      if intervention.latents.shape[:1] != (n,) or intervention.value.shape[:1] != (n,):
        raise ValueError(f"per_variant=True needs latents and value stacked on a leading axis "
                         f"of the {n} variants, got {intervention.latents.shape} and "
                         f"{intervention.value.shape}.")
      for i in range(n):
        check_intervention(with_latents(intervention, intervention.latents[i],
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
  check_site(model_config, site, sae_config, splice_mode, tokens_BT)
  return _site_codes_jit(lm_params, sae_params, hparams, sae_state, jnp.asarray(tokens_BT),
                         model_config=model_config, site=site, sae_config=sae_config,
                         splice_mode=splice_mode)


_site_codes_jit = jax.jit(_site_codes, static_argnames=STATIC_ARGNAMES)


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

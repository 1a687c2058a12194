"""Metric formulas of specs/sae.md on plain arrays: per-token values, means, latent counts.

Everything here is a pure function of arrays, with no model, SAE or data inside: the per-token
terms (`token_*`: squared error, explained variance, cross-entropy, KL, total variation, top-1
agreement, grammatical mass) that `evaluate` sums over its held-out batches, the whole-array
forms (`masked_mean`, `explained_variance`) and the host-side ratios and counts
(`ce_recovered`, `latent_counts`, `density_histogram`). Which tokens count, and how the sums
become the reported metrics, is `eval_passes`'s business (its module docstring).

Conventions: x = target activation, x̂ = reconstruction, mu = the token mean of x (an argument:
the pipeline computes it over the held-out set), LN = layer norm over the last axis without
affine parameters and eps `LN_EPS` (e2e_sae's `_layer_norm_pre`). Logits are cast to float32
before any softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

DENSE_THRESHOLD = 0.1  # a latent is dense if it fires on more than this fraction of tokens
DENSITY_BIN_EDGES = np.linspace(-6.0, 0.0, 13)  # log10 firing-frequency bins (width 0.5)
LN_EPS = 1e-5  # e2e_sae's layer norm (no affine) for ev_layernorm


def _lead(v: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a trailing-axis vector to `like`'s rank (explicit, for rank_promotion='raise')."""
  return v.reshape((1,) * (like.ndim - v.ndim) + v.shape)


def layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
  """Layer norm over the last axis without affine parameters: (x - mean) / sqrt(var + eps)."""
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  return centred / jnp.sqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)


def token_sq_error(x_hat: jax.Array, x: jax.Array) -> jax.Array:
  """Σ_d (x̂ - x)², `[..., D] -> [...]`."""
  return jnp.sum(jnp.square(x_hat - x), axis=-1)


def token_explained_variance(x_hat: jax.Array, x: jax.Array, mean_D: jax.Array) -> jax.Array:
  """1 - Σ_d (x̂ - x)² / Σ_d (x - mean)² per token (e2e_sae's form before its token mean)."""
  den = jnp.sum(jnp.square(x - _lead(mean_D, x)), axis=-1)
  return 1.0 - token_sq_error(x_hat, x) / jnp.maximum(den, 1e-12)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position, `[..., V], [...] -> [...]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def token_kl(clean_logits: jax.Array, spliced_logits: jax.Array) -> jax.Array:
  """KL(p_clean ‖ p_spliced) = Σ_v p (log p - log q) per position."""
  logp = jax.nn.log_softmax(clean_logits.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(spliced_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def token_total_variation(clean_logits: jax.Array, spliced_logits: jax.Array) -> jax.Array:
  """½ Σ_v |p_clean - p_spliced| per position."""
  p = jax.nn.softmax(clean_logits.astype(jnp.float32), axis=-1)
  q = jax.nn.softmax(spliced_logits.astype(jnp.float32), axis=-1)
  return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def token_top1_agreement(clean_logits: jax.Array, spliced_logits: jax.Array) -> jax.Array:
  """1.0 where both distributions have the same most likely token, else 0.0."""
  same = jnp.argmax(clean_logits, axis=-1) == jnp.argmax(spliced_logits, axis=-1)
  return same.astype(jnp.float32)


def token_grammatical_mass(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Σ_v softmax(logits)_v over the grammatical next tokens (`valid`, bool `[..., V]`)."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.where(valid, p, 0.0), axis=-1)


def latent_fire_counts(codes: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ_tokens weight · [code != 0] per latent, `[..., F]` codes and `[...]` weights -> `[F]`.

  One matrix-vector product (float32: exact integer counts below 2^24 per latent). XLA's CPU
  backend lowers the equivalent integer reduction over `[tokens, F]` to a reduce-window that
  costs as much as an SAE matrix multiply. No gradient flows through the comparison.
  """
  nonzero = (jax.lax.stop_gradient(codes) != 0).astype(jnp.float32)
  return jnp.einsum("n,nf->f", weights.astype(jnp.float32).reshape(-1),
                    nonzero.reshape(-1, codes.shape[-1]))


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Σ mask·values / Σ mask over all axes (NaN when the mask is empty)."""
  if mask is None:
    return jnp.mean(values)
  w = mask.astype(jnp.float32)
  return jnp.sum(w * values) / jnp.sum(w)


def explained_variance(x_hat: jax.Array, x: jax.Array, mask: jax.Array | None = None, *,
                       form: str = "token_mean", layernorm: bool = False,
                       mean_D: jax.Array | None = None) -> jax.Array:
  """Explained variance of `x_hat` for `x` (`[..., D]`) over the masked tokens.

  Args:
    x_hat, x: reconstruction and target.
    mask: bool `x.shape[:-1]` or None (all tokens).
    form: `token_mean`: mean over tokens of 1 - Σ_d (x̂-x)² / Σ_d (x-mu)² (e2e_sae);
      `ratio_of_sums`: 1 - Σ_tokens Σ_d (x̂-x)² / Σ_tokens Σ_d (x-mu)² (1 - FVU).
    layernorm: apply `layer_norm` to x_hat and x first (e2e_sae's `layer_norm=True`).
    mean_D: mu; default the masked token mean of (the layer-normed) x.

  Returns:
    A scalar.
  """
  if form not in ("token_mean", "ratio_of_sums"):
    raise ValueError(f"form={form!r}: use 'token_mean' or 'ratio_of_sums'")
  if layernorm:
    x_hat, x = layer_norm(x_hat), layer_norm(x)
  w = (jnp.ones(x.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32))
  if mean_D is None:
    lead = tuple(range(x.ndim - 1))
    mean_D = jnp.sum(w[..., None] * x, axis=lead) / jnp.sum(w)
  if form == "token_mean":
    return masked_mean(token_explained_variance(x_hat, x, mean_D), w)
  den = jnp.sum(w * jnp.sum(jnp.square(x - _lead(mean_D, x)), axis=-1))
  return 1.0 - jnp.sum(w * token_sq_error(x_hat, x)) / den


def ce_recovered(ce_ablated, ce_spliced, ce_clean):
  """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 = as good as clean, 0 = ablated."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return (np.asarray(ce_ablated, np.float64) - ce_spliced) / (
        np.asarray(ce_ablated, np.float64) - ce_clean)


def latent_counts(fired_NF: np.ndarray, window: int) -> dict[str, np.ndarray]:
  """Alive / dead / dense latent counts and fractions from firing counts over `window` tokens.

  Args:
    fired_NF: int `[..., F]`, tokens (of the window) on which each latent was nonzero.
    window: number of tokens in the window (> 0).

  Returns:
    dict of `[...]` arrays: alive, dead, dense (counts) and alive_fraction, dead_fraction,
    dense_fraction (of F).
  """
  fired = np.asarray(fired_NF)
  f = fired.shape[-1]
  alive = np.sum(fired > 0, axis=-1)
  dense = np.sum(fired > DENSE_THRESHOLD * window, axis=-1)
  return {"alive": alive, "dead": f - alive, "dense": dense, "alive_fraction": alive / f,
          "dead_fraction": (f - alive) / f, "dense_fraction": dense / f}


def density_histogram(fired_NF: np.ndarray, window: int) -> np.ndarray:
  """Alive latents per log10(firing frequency) bin of `DENSITY_BIN_EDGES`, `[..., n_bins]`.

  Bin i holds edges[i] <= log10(count / window) < edges[i+1]; the first bin also takes
  frequencies below 10^edges[0], the last includes frequency 1. Dead latents are not counted.
  """
  fired = np.asarray(fired_NF)
  n_bins = len(DENSITY_BIN_EDGES) - 1
  with np.errstate(divide="ignore"):
    log_freq = np.log10(fired / max(window, 1))
  idx = np.clip(np.searchsorted(DENSITY_BIN_EDGES, log_freq, side="right") - 1, 0, n_bins - 1)
  onehot = (idx[..., None] == np.arange(n_bins)) & (fired > 0)[..., None]
  return onehot.sum(axis=-2)

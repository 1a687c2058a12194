"""Dead-latent resampling at set steps (Anthropic, "Towards Monosemanticity", 2023), for ONE
variant.

At each of `SAEConfig.resample_steps`, the latents dead by `SAEState.since_fired` (no firing for
`SAEHparams.dead_tokens` training tokens, AuxK's counter) are re-initialised from the step's
inputs with a high reconstruction loss:

- inputs are drawn without replacement with probability ∝ their squared reconstruction error
  ‖x̂ − x‖² (masked-out and perfectly reconstructed tokens never), one per dead latent in latent
  order; dead latents beyond the number of drawable inputs stay as they are;
- the decoder row becomes the input's direction x / ‖x‖; the encoder column the same direction
  times 0.2 × the mean encoder-column norm of the alive latents (1 when none is alive); the
  encoder bias 0 (gated SAEs: also r_mag and b_mag, their initial values);
- their Adam moments (mu, nu; every parameter's rows of the latent) are set to 0 and their
  since-fired counters to 0.

The paper drew from 819,200 inputs; here the inputs are the step's batch (its selected tokens).
Everything else is left bit-for-bit as it was.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from jaxsae.grid import sae as sae_lib

ENCODER_SCALE = 0.2  # Anthropic 2023: encoder rows at 0.2 × the mean alive encoder norm
# Parameters with a latent axis (name -> axis): their resampled rows and Adam moments are reset.
LATENT_AXIS = {"w_enc": 1, "w_dec": 0, "b_enc": 0, "r_mag": 0, "b_mag": 0}


def draw_inputs(key: jax.Array, weights_N: jax.Array, n_draws: int) -> tuple[jax.Array, jax.Array]:
  """`n_draws` indices into N drawn without replacement with probability ∝ `weights_N` (>= 0;
  Gumbel top-k), and whether each draw exists (False past the count of positive weights)."""
  chex.assert_rank(weights_N, 1)
  w = jnp.asarray(weights_N, jnp.float32)
  pos = w > 0
  keys = jnp.where(pos, jnp.log(jnp.where(pos, w, 1.0)) + jax.random.gumbel(key, w.shape),
                   -jnp.inf)
  order = jnp.argsort(-keys)
  idx = order[jnp.minimum(jnp.arange(n_draws), w.shape[0] - 1)]
  return idx, jnp.arange(n_draws) < jnp.sum(pos)


def _set_latents(a: jax.Array, axis: int, chosen_F: jax.Array, rows: jax.Array) -> jax.Array:
  """`a` with its latent slices at `chosen_F` replaced by `rows` (same layout as `a`)."""
  shape = [1] * a.ndim
  shape[axis] = a.shape[axis]
  return jnp.where(chosen_F.reshape(shape), rows.astype(a.dtype), a)


def zero_moments(opt_state: Any, chosen_F: jax.Array) -> Any:
  """The optimizer state with every parameter's slices of the `chosen_F` latents set to 0 (the
  Adam moments mu / nu are dicts keyed like the params; the step count is left alone)."""
  def reset(path, leaf):
    name = getattr(path[-1], "key", None) if path else None
    if name not in LATENT_AXIS or jnp.ndim(leaf) == 0:
      return leaf
    return _set_latents(leaf, LATENT_AXIS[name], chosen_F, jnp.zeros_like(leaf))
  return jax.tree_util.tree_map_with_path(reset, opt_state)


def resample(key: jax.Array, params: dict, opt_state: Any, state: sae_lib.SAEState,
             hparams: sae_lib.SAEHparams, inputs_ND: jax.Array, sq_err_N: jax.Array,
             allowed: jax.Array, config: sae_lib.SAEConfig):
  """Resamples one variant's dead latents (see the module docstring).

  Args:
    key: this variant's and step's random key.
    params, opt_state, state: the variant's parameters, optimizer state and SAE state (with
      `since_fired`).
    hparams: its hparams (`dead_tokens`).
    inputs_ND: the step's SAE inputs.
    sq_err_N: their squared reconstruction errors, 0 where masked out.
    allowed: bool scalar; False resamples nothing (a frozen variant).
    config: the static config (an encoder with `w_enc`).

  Returns:
    `(params, opt_state, state, n)`: n the number of latents resampled (int32).
  """
  chex.assert_rank([inputs_ND, sq_err_N], [2, 1])
  dead_F = sae_lib.dead_latents(state, hparams) & allowed
  f = config.width
  idx_F, exists_F = draw_inputs(key, sq_err_N, f)
  rank_F = jnp.cumsum(dead_F.astype(jnp.int32)) - 1
  safe_rank = jnp.clip(rank_F, 0, f - 1)
  chosen_F = dead_F & exists_F[safe_rank]
  x_FD = inputs_ND[idx_F[safe_rank]].astype(jnp.float32)
  dir_FD = sae_lib.l2_normalize(x_FD)
  norms_F = jnp.linalg.norm(params["w_enc"], axis=0)
  alive_F = ~sae_lib.dead_latents(state, hparams)
  n_alive = jnp.sum(alive_F)
  alive_norm = jnp.where(n_alive > 0, jnp.sum(jnp.where(alive_F, norms_F, 0.0)) /
                         jnp.maximum(n_alive, 1), 1.0)
  new = dict(params)
  new["w_dec"] = _set_latents(params["w_dec"], 0, chosen_F, dir_FD)
  new["w_enc"] = _set_latents(params["w_enc"], 1, chosen_F,
                              (dir_FD * (ENCODER_SCALE * alive_norm)).T)
  for name in ("b_enc", "r_mag", "b_mag"):
    if name in params:
      new[name] = _set_latents(params[name], 0, chosen_F, jnp.zeros_like(params[name]))
  state = state.replace(since_fired=jnp.where(chosen_F, 0, state.since_fired))
  return new, zero_moments(opt_state, chosen_F), state, jnp.sum(chosen_F.astype(jnp.int32))

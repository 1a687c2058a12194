"""Sparse autoencoders as pure functions over a parameter pytree, written for ONE variant.

A grid of N variants sharing an `SAEConfig` (static: shapes, control flow; one compilation group)
is run with `jax.vmap` at the call site over stacked params, `SAEHparams` (dynamic per-variant
scalars) and `SAEState` (non-gradient state), the activations broadcast:

    fwd = jax.vmap(lambda p, x, h, s: sae_lib.forward(p, x, config, h, state=s, train=True),
                   in_axes=(0, None, 0, 0))
    x_hat_NBTD, codes_NBTF, aux_N = fwd(params_N, x_BTD, hparams_N, state_N)

Params (a dict; its keys depend only on the config). Layouts are the spec's matrices transposed:
    w_enc [D, F]   `pre = x @ w_enc` (spec W_enc is F x D); absent for sparsemax encoders.
    b_enc [F], b_dec [D], b_pre [D]   if `enc_bias` / `dec_bias` / `pre_bias`.
    a [F, D], lam []   sparsemax encoders: prototypes (unit-normalised inside the forward, as
                   Menon's `normalize_weight`) and the trainable scalar lambda.
    w_dec [F, D]   row j = dictionary direction j, `x_hat = codes @ w_dec` (spec W_dec is D x F;
                   e2e init: w_decᵀ w_dec = I_D, i.e. W_dec W_decᵀ = I).
    log_threshold [F]  JumpReLU, theta = exp(log_threshold).

Forward: x_in = x/‖x‖ if `input_norm` else x; pre = (x_in − b_pre) @ w_enc + b_enc;
codes = act(pre); x_hat = codes @ dictionary + b_dec + b_pre, then x_hat/‖x_hat‖ if `recon_norm`.
x_hat lives in the SAE's space, its target is `aux['target']` (= x_in); `splice` maps back.
Sparsemax encoders, x̃ = (x_in − b_pre)/‖x_in − b_pre‖ and a_j the unit rows of `a`: `no_kds`
sparsemax(lam·x̃·a_j); `recon_dist` sparsemax(x̃·a_j − lam‖x̃ − a_j‖²); `dist`
sparsemax(−lam‖x̃ − a_j‖²); no encoder bias.

JumpReLU (Rajamanoharan et al. 2024), z = pre, H(u) = 1[u > 0], rect(u) = 1[|u| < 1/2], eps the
bandwidth: codes = z·H(z − theta), with d/dz = H(z − theta), d/dtheta = −(theta/eps)·rect((z −
theta)/eps); the L0 surrogate `aux['gates']` = H(z − theta), with d/dz = 0, d/dtheta =
−(1/eps)·rect((z − theta)/eps) (penalise L0 with `losses.sparsity(gates, ...)`). `log_threshold`
gets theta times these.

BatchTopK (Bussmann et al. 2024). `train=True`: over all masked-in tokens of the call (leading
axes flattened), keep the k·n_tokens largest positive pre-activations (a mask over the static
k_max·n_tokens top entries: exactly k·n_tokens nonzeros when enough are positive); the smallest
kept value m updates `SAEState.threshold` by an EMA under stop_gradient (thr ← m on the first
update, then decay·thr + (1 − decay)·m, decay = `hparams.threshold_decay`), returned as
`aux['state']` for the trainer to carry next to the params. `train=False` (default, inference):
codes = relu(pre)·1[pre > thr] per token (thr = 0 before any update: plain ReLU). Masked-out
tokens take no part in the selection or the EMA and are encoded with the threshold.

Sparse decode (`SAEConfig.decode`, resolved by `sparse_decode`): TopK codes (and BatchTopK's in
training) are also held as their active entries (`active_codes.ActiveCodes`, `aux['active']`);
x_hat is summed from the gathered dictionary rows of the active latents, and the backward pass
stays on them: d w_dec only at the gathered rows (scatter-add), d codes only at the active
positions, and d w_enc, d b_enc, d x from the active pre-activations only. (The dense path's
gradient multiplies the zeros: XLA lowers d w_enc to a dense `[D, n] @ [n, F]` product of the
scattered code gradient.) The encoder's forward stays dense: the selection needs every
pre-activation. The values are the dense decode's, the sums run in another order (float32
differences ~1e-6 relative; a smoke grid's final parameters and metrics agree to 1e-4 relative,
tests/train_sae_test.py). Sparse BatchTopK leaves masked-out tokens' codes at zero instead of
thresholding them: nothing reads them in training (they weigh 0 in every loss term and metric,
and `splice` keeps x there). `auto` takes the sparse path for TopK on CPU (k_max <= 32), where
it was measured faster; see `sparse_decode`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grid import active_codes

Params = dict[str, jax.Array]

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "sparsemax_no_kds",
               "sparsemax_recon_dist", "sparsemax_dist")
SPARSEMAX_ACTIVATIONS = ("sparsemax_no_kds", "sparsemax_recon_dist", "sparsemax_dist")
DECODER_NORMS = ("none", "forward", "project")
INITS = ("e2e", "menon")
PRE_BIAS_INITS = ("zero", "mean", "median")
SPLICE_MODES = ("corrected", "original")
DECODES = ("auto", "dense", "sparse")
_EPS = 1e-8  # norms are clipped below at _EPS before dividing (Menon adds 1e-8)


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{field}={value!r} is unknown; choose one of {', '.join(choices)}.")


def _is_positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """Static SAE architecture (hashable: one config = one compilation group).

  Attributes:
    d_in: input width D.
    width: number of latents F (expansion × D).
    activation: one of `ACTIVATIONS`.
    k_max: static upper bound on k for `topk` / `batchtopk` (1 <= k_max <= width); must be None
      for other activations (so configs differing only in an unused k_max are one group).
    enc_bias, dec_bias, pre_bias: which biases exist (see the module docstring).
    decoder_norm: `none`; `forward` (directions divided by their L2 norm inside the forward);
      `project` (unit norm kept by the trainer: `project_gradients`, step, `renormalize`).
    input_norm, recon_norm: L2-normalise x before the SAE / x_hat (Menon's `input` / `recon`).
    init: `e2e` (e2e_sae) or `menon`; see `init`.
    pre_bias_init: `zero`, or `mean` / `median` (geometric) of a data sample (needs `pre_bias`).
    decode: how `topk` / `batchtopk` codes are decoded: `dense` (`codes @ dictionary`),
      `sparse` (from the active latents only, forward and backward; see `sparse_decode`), or
      `auto` (per backend, from measurements: `sparse_decode`). Other activations: always dense.
  """

  d_in: int
  width: int
  activation: str = "relu"
  k_max: int | None = None
  enc_bias: bool = True
  dec_bias: bool = True
  pre_bias: bool = False
  decoder_norm: str = "forward"
  input_norm: bool = False
  recon_norm: bool = False
  init: str = "e2e"
  pre_bias_init: str = "zero"
  decode: str = "auto"

  def __post_init__(self):
    for name in ("d_in", "width"):
      if not _is_positive_int(getattr(self, name)):
        raise ValueError(f"SAEConfig.{name} must be a positive int, got {getattr(self, name)!r}.")
    for name in ("enc_bias", "dec_bias", "pre_bias", "input_norm", "recon_norm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"SAEConfig.{name} must be a bool, got {getattr(self, name)!r}.")
    _check_choice("SAEConfig.activation", self.activation, ACTIVATIONS)
    _check_choice("SAEConfig.decoder_norm", self.decoder_norm, DECODER_NORMS)
    _check_choice("SAEConfig.init", self.init, INITS)
    _check_choice("SAEConfig.pre_bias_init", self.pre_bias_init, PRE_BIAS_INITS)
    _check_choice("SAEConfig.decode", self.decode, DECODES)
    if self.decode == "sparse" and not self.uses_k:
      raise ValueError(f"SAEConfig.decode='sparse' needs a topk/batchtopk activation (got "
                       f"{self.activation!r}); use decode='auto' or 'dense'.")
    if self.uses_k:
      if not _is_positive_int(self.k_max):
        raise ValueError(f"SAEConfig.k_max must be a positive int for activation="
                         f"{self.activation!r}, got {self.k_max!r}; set it to the largest k swept.")
      if self.k_max > self.width:
        raise ValueError(f"SAEConfig.k_max={self.k_max} exceeds width={self.width}; lower k_max "
                         f"or widen the SAE.")
    elif self.k_max is not None:
      raise ValueError(f"SAEConfig.k_max only applies to topk/batchtopk; set it to None for "
                       f"activation={self.activation!r}.")
    if self.is_sparsemax and self.enc_bias:
      raise ValueError(f"SAEConfig.enc_bias must be False for activation={self.activation!r} "
                       f"(sparsemax encoders have no encoder bias).")
    if self.pre_bias_init != "zero" and not self.pre_bias:
      raise ValueError(f"SAEConfig.pre_bias_init={self.pre_bias_init!r} needs pre_bias=True; "
                       f"set pre_bias=True or pre_bias_init='zero'.")
    if self.init == "e2e" and self.width < self.d_in:
      raise ValueError(f"SAEConfig.init='e2e' needs width >= d_in for W_dec W_decᵀ = I (got "
                       f"width={self.width}, d_in={self.d_in}); widen the SAE or use init='menon'.")

  @property
  def uses_k(self) -> bool:
    return self.activation in ("topk", "batchtopk")

  @property
  def is_sparsemax(self) -> bool:
    return self.activation in SPARSEMAX_ACTIVATIONS


@flax.struct.dataclass
class SAEHparams:
  """Dynamic per-variant hyperparameters (scalars; stacked on a leading axis N for a grid).

  Attributes:
    k: int32, latents kept per token for `topk` / `batchtopk` (1 <= k <= k_max).
    jumprelu_bandwidth: the STE rectangle-kernel bandwidth eps (> 0).
    jumprelu_init_threshold: initial theta (> 0); used by `init` only.
    threshold_decay: BatchTopK threshold EMA decay in [0, 1).
  """

  k: jax.Array
  jumprelu_bandwidth: jax.Array
  jumprelu_init_threshold: jax.Array
  threshold_decay: jax.Array


def default_hparams(config: SAEConfig, **overrides: Any) -> SAEHparams:
  """Scalar hparams for one variant: k = k_max (or 0), eps = theta_0 = 1e-3, decay 0.99."""
  values = dict(k=config.k_max or 0, jumprelu_bandwidth=1e-3, jumprelu_init_threshold=1e-3,
                threshold_decay=0.99)
  unknown = set(overrides) - set(values)
  if unknown:
    raise ValueError(f"Unknown SAEHparams field(s) {sorted(unknown)}; valid: {sorted(values)}.")
  values.update(overrides)
  return SAEHparams(
      k=jnp.asarray(values.pop("k"), jnp.int32),
      **{name: jnp.asarray(v, jnp.float32) for name, v in values.items()})


def check_hparams(hparams: SAEHparams, config: SAEConfig) -> None:
  """Validates concrete (possibly stacked) hparams before compiling; raises ValueError."""
  k = np.asarray(hparams.k)
  if config.uses_k and (k.min() < 1 or k.max() > config.k_max):
    raise ValueError(f"SAEHparams.k must lie in [1, k_max={config.k_max}], got {k.tolist()}; "
                     f"raise SAEConfig.k_max or lower k.")
  for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
    v = np.asarray(getattr(hparams, name))
    if not (np.all(np.isfinite(v)) and np.all(v > 0)):
      raise ValueError(f"SAEHparams.{name} must be finite and > 0, got {v.tolist()}.")
  v = np.asarray(hparams.threshold_decay)
  if not np.all((v >= 0) & (v < 1)):
    raise ValueError(f"SAEHparams.threshold_decay must lie in [0, 1), got {v.tolist()}.")


@flax.struct.dataclass
class SAEState:
  """Non-gradient state: BatchTopK's inference threshold (present, unused, for all activations)."""

  threshold: jax.Array  # float32 scalar
  count: jax.Array  # int32 scalar, number of EMA updates so far


def init_state(config: SAEConfig) -> SAEState:
  del config  # the same structure for every config
  return SAEState(threshold=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------
# Init.


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _safe_norm(x: jax.Array) -> jax.Array:
  # max(‖x‖, eps) with a finite gradient at x = 0 (x_hat is 0 when all latents are off).
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), _EPS**2))


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / _safe_norm(x)


def _lead(v: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a trailing-axis vector to `like`'s rank (explicit, for rank_promotion='raise')."""
  return v.reshape((1,) * (like.ndim - v.ndim) + v.shape)


def _geometric_median(x_ND: jax.Array, iters: int = 64) -> jax.Array:
  """Weiszfeld iterations from the mean."""
  def step(_, m_D):
    w_N = 1.0 / jnp.maximum(jnp.linalg.norm(x_ND - m_D[None], axis=-1), _EPS)
    return jnp.einsum("n,nd->d", w_N, x_ND) / jnp.sum(w_N)
  return jax.lax.fori_loop(0, iters, step, jnp.mean(x_ND, axis=0))


def init(key: jax.Array, config: SAEConfig, data_sample: jax.Array | None = None,
         hparams: SAEHparams | None = None) -> Params:
  """Initialises one SAE (vmap over keys and hparams for a grid).

  Both styles: w_enc, b_enc ~ U(±1/√D); b_dec ~ U(±1/√F); b_pre zero or the mean / geometric
  median of `data_sample` (input-normalised first under `input_norm`); sparsemax `a` = unit
  N(0, 1) rows, lam = N(0, 1)²; log_threshold = log(hparams.jumprelu_init_threshold); `project`
  decoders start unit-norm. w_dec: e2e orthogonal (w_decᵀ w_dec = I_D); menon U(±1/√F), or
  N(0, 1) under decoder_norm='forward' (Menon's `dec`). Menon's own SAEs have enc_bias=pre_bias,
  dec_bias=False.

  Args:
    key: a typed PRNG key.
    config: the architecture.
    data_sample: `[..., D]` activations, required when `pre_bias_init` is `mean` / `median`.
    hparams: needed only for the JumpReLU initial threshold (defaults otherwise).

  Returns:
    The params dict (float32) described in the module docstring.
  """
  hparams = default_hparams(config) if hparams is None else hparams
  d, f = config.d_in, config.width
  k_enc, k_benc, k_dec, k_bdec, k_lam = jax.random.split(key, 5)
  params = {}
  if config.is_sparsemax:
    params["a"] = _l2_normalize(jax.random.normal(k_enc, (f, d), jnp.float32))
    params["lam"] = jnp.square(jax.random.normal(k_lam, (), jnp.float32))
  else:
    params["w_enc"] = _uniform(k_enc, (d, f), 1 / math.sqrt(d))
  if config.enc_bias:
    params["b_enc"] = _uniform(k_benc, (f,), 1 / math.sqrt(d))
  if config.init == "e2e":
    # (F, D) with F >= D: orthonormal columns, i.e. the D x F W_dec has orthonormal rows.
    params["w_dec"] = jax.nn.initializers.orthogonal()(k_dec, (f, d), jnp.float32)
  elif config.decoder_norm == "forward":
    params["w_dec"] = jax.random.normal(k_dec, (f, d), jnp.float32)
  else:
    params["w_dec"] = _uniform(k_dec, (f, d), 1 / math.sqrt(f))
  if config.decoder_norm == "project":
    params["w_dec"] = _l2_normalize(params["w_dec"])
  if config.dec_bias:
    params["b_dec"] = _uniform(k_bdec, (d,), 1 / math.sqrt(f))
  if config.pre_bias:
    params["b_pre"] = _init_pre_bias(config, data_sample)
  if config.activation == "jumprelu":
    params["log_threshold"] = jnp.full((f,), jnp.log(hparams.jumprelu_init_threshold), jnp.float32)
  return params


def _init_pre_bias(config: SAEConfig, data_sample: jax.Array | None) -> jax.Array:
  if config.pre_bias_init == "zero":
    return jnp.zeros((config.d_in,), jnp.float32)
  if data_sample is None:
    raise ValueError(f"SAEConfig.pre_bias_init={config.pre_bias_init!r} needs a data_sample "
                     f"[..., {config.d_in}] passed to init.")
  x_ND = jnp.asarray(data_sample, jnp.float32).reshape(-1, config.d_in)
  if config.input_norm:
    x_ND = _l2_normalize(x_ND)
  return jnp.mean(x_ND, axis=0) if config.pre_bias_init == "mean" else _geometric_median(x_ND)


# ------------------------------------------------------------------------------------------------
# Activation functions.


@jax.custom_jvp
def sparsemax(z: jax.Array) -> jax.Array:
  """Euclidean projection of z onto the probability simplex along the last axis (exact, by
  sorting; Martins & Astudillo 2016), with the exact Jacobian diag(s) − s sᵀ/|s|, s = support."""
  z = z - jnp.max(z, axis=-1, keepdims=True)  # shift-invariant; keeps cumsums small
  z_sorted = -jnp.sort(-z, axis=-1)
  cumsum = jnp.cumsum(z_sorted, axis=-1)
  rank = jax.lax.broadcasted_iota(z.dtype, z.shape, z.ndim - 1) + 1
  support_size = jnp.sum(1 + rank * z_sorted > cumsum, axis=-1, keepdims=True)
  tau = (jnp.take_along_axis(cumsum, support_size - 1, axis=-1) - 1) / support_size
  return jnp.maximum(z - tau, 0)


@sparsemax.defjvp
def _sparsemax_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  p = sparsemax(z)
  s = (p > 0).astype(z.dtype)
  dp = s * (dz - jnp.sum(s * dz, axis=-1, keepdims=True) / jnp.sum(s, axis=-1, keepdims=True))
  return p, dp


def _rect(z, theta, bandwidth):
  return (jnp.abs((z - theta) / bandwidth) < 0.5).astype(z.dtype)


@jax.custom_vjp
def _step(z, theta, bandwidth):
  return (z > theta).astype(z.dtype)


_step.defvjp(lambda z, theta, bw: (_step(z, theta, bw), (z, theta, bw)),
             lambda res, g: (jnp.zeros_like(res[0]), -g / res[2] * _rect(*res),
                             jnp.zeros_like(res[2])))


def heaviside_ste(z: jax.Array, theta: jax.Array, bandwidth: jax.Array) -> jax.Array:
  """H(z − theta) with d/dz = 0, d/dtheta = −(1/eps)·rect((z − theta)/eps) (the L0 surrogate);
  theta `[F]` broadcasts over z's leading axes."""
  return _step(z, jnp.broadcast_to(_lead(theta, z), z.shape), bandwidth)


def jumprelu(z: jax.Array, theta: jax.Array, bandwidth: jax.Array) -> jax.Array:
  """z·H(z − theta); d/dz = H(z − theta), d/dtheta = −(theta/eps)·rect((z − theta)/eps)."""
  h = heaviside_ste(z, theta, bandwidth)
  h0 = jax.lax.stop_gradient(h)
  # Value z·H; h − h0 is 0 but carries the STE gradient, times theta: −(theta/eps)·rect.
  return z * h0 + _lead(theta, z) * (h - h0)


_TOPK_SORT_MAX = 32  # k_max above which `topk` finds the k-th value by bisection


def _kth_largest_positive_bits(pre: jax.Array, k: jax.Array) -> jax.Array:
  """Bit pattern (int32) of the k-th largest positive value per row (last axis), by bisection.

  For x >= 0 the float32 bit patterns, read as int32, are ordered like the values, so 31 halvings
  of [0, bits(inf)] find the largest pattern b with #{x >= b} >= k exactly. Rows with fewer
  than k positive values get 1 (keep every positive value). Cost: 31 fused compare-and-count
  passes, independent of k (XLA's CPU top_k grows with k: 44 ms vs this 13 ms for forward +
  backward at 1,600 × 1,024, k_max 128).
  """
  bits = jax.lax.bitcast_convert_type(
      jax.lax.stop_gradient(jnp.maximum(pre, 0)).astype(jnp.float32), jnp.int32)
  lead = pre.shape[:-1] + (1,)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid, axis=-1, keepdims=True) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros(lead, jnp.int32),
                                            jnp.full(lead, 0x7F800001, jnp.int32)))
  return bits, jnp.maximum(lo, 1)


def topk(pre: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
  """Keeps the k largest of relu(pre) per token (last axis); k dynamic, k <= k_max static.

  For k_max <= 32 by `lax.top_k` and a scatter; above, by thresholding at the k-th largest
  value found by bisection (`_kth_largest_positive_bits`), which is cheaper on CPU for large k.
  The two agree except on exact ties at the k-th value, which the threshold keeps all of.
  """
  if k_max > _TOPK_SORT_MAX:
    bits, threshold = _kth_largest_positive_bits(pre, k)
    return jnp.where(bits >= threshold, pre, 0).astype(pre.dtype)
  vals, idx = jax.lax.top_k(pre, k_max)
  keep = jax.lax.broadcasted_iota(jnp.int32, vals.shape, vals.ndim - 1) < k
  vals = jnp.where(keep, jnp.maximum(vals, 0), 0)
  lead, f = pre.shape[:-1], pre.shape[-1]
  n = math.prod(lead)
  rows = jnp.arange(n)[:, None]
  out = jnp.zeros((n, f), pre.dtype).at[rows, idx.reshape(n, k_max)].set(vals.reshape(n, k_max))
  return out.reshape(pre.shape)


def batch_topk(pre: jax.Array, k: jax.Array, k_max: int,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keeps the k·n largest positive pre-activations over all n masked-in tokens; returns
  `(codes, min_kept, any_kept)` (codes zero at masked-out tokens; min_kept inf if none kept)."""
  lead, f = pre.shape[:-1], pre.shape[-1]
  n = math.prod(lead)
  valid_N = (jnp.ones((n,), bool) if mask is None
             else jnp.broadcast_to(mask, lead).reshape(n).astype(bool))
  scores = jnp.where(jnp.broadcast_to(valid_N[:, None], (n, f)), pre.reshape(n, f), -jnp.inf)
  vals, idx = jax.lax.top_k(scores.reshape(n * f), k_max * n)
  budget = k * jnp.sum(valid_N.astype(jnp.int32))
  keep = (jnp.arange(k_max * n) < budget) & (vals > 0)
  vals = jnp.where(keep, vals, 0)
  codes = jnp.zeros((n * f,), pre.dtype).at[idx].set(vals).reshape(pre.shape)
  min_kept = jnp.min(jnp.where(keep, vals, jnp.inf))
  return codes, min_kept, jnp.any(keep)


# ------------------------------------------------------------------------------------------------
# Encoder, decoder, forward.


def dictionary(params: Params, config: SAEConfig) -> jax.Array:
  """The decoder directions `[F, D]` as used in the forward (unit rows for `forward`)."""
  w_FD = params["w_dec"]
  return _l2_normalize(w_FD) if config.decoder_norm == "forward" else w_FD


def _encoder_input(params: Params, x_in: jax.Array, config: SAEConfig) -> jax.Array:
  return x_in - _lead(params["b_pre"], x_in) if config.pre_bias else x_in


def _pre_acts(params: Params, x_in: jax.Array, config: SAEConfig) -> jax.Array:
  x_in = _encoder_input(params, x_in, config)
  if not config.is_sparsemax:
    pre = jnp.einsum("...d,df->...f", x_in, params["w_enc"])
    return pre + _lead(params["b_enc"], pre) if config.enc_bias else pre
  xt = _l2_normalize(x_in)
  a_FD = _l2_normalize(params["a"])
  lam = params["lam"]
  dots = jnp.einsum("...d,fd->...f", xt, a_FD)
  if config.activation == "sparsemax_no_kds":
    return lam * dots
  sq_dist = (jnp.sum(jnp.square(xt), axis=-1, keepdims=True)
             + _lead(jnp.sum(jnp.square(a_FD), axis=-1), dots) - 2 * dots)
  if config.activation == "sparsemax_recon_dist":
    return dots - lam * sq_dist
  return -lam * sq_dist


def sparse_decode(config: SAEConfig, train: bool = False) -> bool:
  """Whether `forward` encodes into `active_codes.ActiveCodes` and decodes from them.

  Only for `topk` (training or not) and `batchtopk` in training mode (at inference its codes come
  from a threshold, with no bound on the count per token). `decode='auto'` takes the sparse path
  where it was measured faster (`benchmarks/sae.py --activations relu,topk --decode ...`, see its
  docstring): on CPU for `topk` with k_max <= 32 (selection by `lax.top_k`, which `topk` uses
  there anyway); for `batchtopk` the selection over the whole batch dominates and the dense path
  stays. Other backends: dense until measured there.
  """
  if not config.uses_k or config.decode == "dense":
    return False
  if config.activation == "batchtopk" and not train:
    return False
  if config.decode == "sparse":
    return True
  return (jax.default_backend() == "cpu" and config.activation == "topk"
          and config.k_max <= _TOPK_SORT_MAX)


def _active_inputs(params, x_in, pre, config):
  """(pre `[n, F]` under stop_gradient, the encoder's input `[n, D]`, b_enc or zeros)."""
  n = math.prod(pre.shape[:-1])
  xb_ND = _encoder_input(params, x_in, config).reshape(n, config.d_in)
  b_F = params["b_enc"] if config.enc_bias else jnp.zeros((config.width,), pre.dtype)
  return jax.lax.stop_gradient(pre).reshape(n, config.width), xb_ND, b_F


def _batch_topk_state(state, hparams, min_kept, any_kept):
  m = jax.lax.stop_gradient(min_kept)
  ema = hparams.threshold_decay * state.threshold + (1 - hparams.threshold_decay) * m
  new_thr = jnp.where(state.count == 0, m, ema)
  return SAEState(threshold=jnp.where(any_kept, new_thr, state.threshold).astype(jnp.float32),
                  count=state.count + any_kept.astype(jnp.int32))


def _encode(params, x_in, config, hparams, state, train, mask):
  state = init_state(config) if state is None else state
  pre = _pre_acts(params, x_in, config)
  aux = {"pre_acts": pre}
  act = config.activation
  if sparse_decode(config, train):
    pre_NF, xb_ND, b_F = _active_inputs(params, x_in, pre, config)
    if act == "topk":
      active = active_codes.topk(pre_NF, xb_ND, params["w_enc"], b_F, hparams.k, config.k_max)
    else:
      valid = None if mask is None else jnp.broadcast_to(mask, pre.shape[:-1]).reshape(-1)
      active, min_kept, any_kept = active_codes.batch_topk(
          pre_NF, xb_ND, params["w_enc"], b_F, hparams.k, config.k_max, valid)
      state = _batch_topk_state(state, hparams, min_kept, any_kept)
    aux["active"] = active
    aux["state"] = state
    return active_codes.to_dense(active).reshape(pre.shape), aux
  if act == "relu":
    codes = jax.nn.relu(pre)
  elif act == "topk":
    codes = topk(pre, hparams.k, config.k_max)
  elif act == "batchtopk":
    thr_codes = jax.nn.relu(pre) * (pre > state.threshold).astype(pre.dtype)
    if train:
      codes, min_kept, any_kept = batch_topk(pre, hparams.k, config.k_max, mask)
      if mask is not None:
        codes = jnp.where(jnp.broadcast_to(mask, pre.shape[:-1])[..., None], codes, thr_codes)
      state = _batch_topk_state(state, hparams, min_kept, any_kept)
    else:
      codes = thr_codes
  elif act == "jumprelu":
    theta = jnp.exp(params["log_threshold"])
    codes = jumprelu(pre, theta, hparams.jumprelu_bandwidth)
    aux["gates"] = heaviside_ste(pre, theta, hparams.jumprelu_bandwidth)
  else:
    codes = sparsemax(pre)
  aux["state"] = state
  return codes, aux


def encode(params: Params, x: jax.Array, config: SAEConfig, hparams: SAEHparams, *,
           state: SAEState | None = None, train: bool = False,
           mask: jax.Array | None = None) -> jax.Array:
  """Codes `[..., F]` of raw `x` `[..., D]` (applies `input_norm`); other args as `forward`."""
  chex.assert_axis_dimension(x, -1, config.d_in)
  x_in = _l2_normalize(x) if config.input_norm else x
  return _encode(params, x_in, config, hparams, state, train, mask)[0]


def decode(params: Params, codes: jax.Array, config: SAEConfig) -> jax.Array:
  """`codes @ dictionary + b_dec + b_pre`, L2-normalised if `recon_norm`; `[..., F] -> [..., D]`."""
  chex.assert_axis_dimension(codes, -1, config.width)
  return _decode_tail(params, jnp.einsum("...f,fd->...d", codes, dictionary(params, config)),
                      config)


def _decode_tail(params: Params, x_hat: jax.Array, config: SAEConfig) -> jax.Array:
  if config.dec_bias:
    x_hat = x_hat + _lead(params["b_dec"], x_hat)
  if config.pre_bias:
    x_hat = x_hat + _lead(params["b_pre"], x_hat)
  return _l2_normalize(x_hat) if config.recon_norm else x_hat


def _forward(params, x, config, hparams, state, train, mask, normalize_input):
  chex.assert_axis_dimension(x, -1, config.d_in)
  x_in = _l2_normalize(x) if normalize_input else x
  codes, aux = _encode(params, x_in, config, hparams, state, train, mask)
  if "active" in aux:
    x_hat_ND = active_codes.decode(aux["active"], dictionary(params, config))
    x_hat = _decode_tail(params, x_hat_ND.reshape(codes.shape[:-1] + (config.d_in,)), config)
  else:
    x_hat = decode(params, codes, config)
  aux["target"] = x_in
  aux["x_hat"] = x_hat  # in the SAE's space (splice's output may be rescaled / masked)
  return x_hat, codes, aux


def forward(params: Params, x: jax.Array, config: SAEConfig, hparams: SAEHparams, *,
            state: SAEState | None = None, train: bool = False,
            mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """Encodes and decodes `x` `[..., D]` (any leading token axes).

  Args:
    params, config, hparams: one variant.
    state: BatchTopK state (default `init_state`).
    train: BatchTopK batch selection and state update (no effect on other activations).
    mask: bool `x.shape[:-1]`, the tokens that take part in BatchTopK's batch selection.

  Returns:
    `(x_hat, codes, aux)`: x_hat `[..., D]` in the SAE's space; codes `[..., F]`; aux with
    `target` (the SAE input, what x_hat reconstructs), `pre_acts` `[..., F]`, `state` (updated in
    BatchTopK training mode, else as given), `gates` (JumpReLU's L0 surrogate) for JumpReLU, and
    `active` (`active_codes.ActiveCodes` of the codes, flattened over the leading axes) when
    `sparse_decode(config, train)`.
  """
  return _forward(params, x, config, hparams, state, train, mask, config.input_norm)


# ------------------------------------------------------------------------------------------------
# Splicing into the model.


def splice(params: Params, x: jax.Array, config: SAEConfig, hparams: SAEHparams,
           mode: str = "corrected", *, mask: jax.Array | None = None,
           state: SAEState | None = None,
           train: bool = False) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """The SAE's replacement of a model activation `x` `[..., D]`, in the model's space.

  Args:
    params, config, hparams: one variant.
    x: the clean activation.
    mode: `corrected`: x normalised if `input_norm`, and when `input_norm` or `recon_norm` the
      output rescaled to x's scale, x_hat·‖x‖ (with `recon_norm`, ‖out‖ = ‖x‖). `original`: raw
      x into the SAE (no input normalisation), its raw output spliced (unit-norm under
      `recon_norm`): the original pipeline's artefact.
    mask: optional bool `x.shape[:-1]`: the SAE applies only where True, other tokens keep x
      (also BatchTopK's token mask).
    state, train: as in `forward`.

  Returns:
    `(out, codes, aux)` as `forward`, with `out` the spliced activation (shape of x).
  """
  _check_choice("splice mode", mode, SPLICE_MODES)
  normalize_input = config.input_norm and mode == "corrected"
  x_hat, codes, aux = _forward(params, x, config, hparams, state, train, mask, normalize_input)
  return to_model_space(x_hat, x, config, mode, mask), codes, aux


def to_model_space(x_hat: jax.Array, x: jax.Array, config: SAEConfig, mode: str = "corrected",
                   mask: jax.Array | None = None) -> jax.Array:
  """What `splice` feeds the model for a decoder output `x_hat` (e.g. of edited codes).

  `corrected` with `input_norm` or `recon_norm`: x_hat·‖x‖; otherwise x_hat as is. Tokens
  outside `mask` (bool `x.shape[:-1]`) keep x.
  """
  _check_choice("splice mode", mode, SPLICE_MODES)
  out = x_hat
  if mode == "corrected" and (config.input_norm or config.recon_norm):
    out = x_hat * _safe_norm(x)
  if mask is not None:
    chex.assert_shape(mask, x.shape[:-1])
    out = jnp.where(mask[..., None], out, x)
  return out


def splice_fn(params: Params, config: SAEConfig, hparams: SAEHparams,
              mode: str = "corrected", *, mask: jax.Array | None = None,
              state: SAEState | None = None) -> Callable[[jax.Array], jax.Array]:
  """`f(x_BTD) -> x_BTD` for `model.apply(..., replace={site: f})` (inference mode)."""
  _check_choice("splice mode", mode, SPLICE_MODES)
  return lambda x_BTD: splice(params, x_BTD, config, hparams, mode=mode, mask=mask,
                              state=state)[0]


# ------------------------------------------------------------------------------------------------
# `project` decoder norm: for the trainer, around each optimizer step.


def project_gradients(params: Params, grads: Params, config: SAEConfig) -> Params:
  """Removes from `grads['w_dec']` its component along each unit dictionary direction.

  A no-op unless `decoder_norm == 'project'`; works on stacked `[N, F, D]` params too.
  """
  if config.decoder_norm != "project":
    return grads
  u = _l2_normalize(params["w_dec"])
  g = grads["w_dec"]
  return {**grads, "w_dec": g - jnp.sum(g * u, axis=-1, keepdims=True) * u}


def renormalize(params: Params, config: SAEConfig) -> Params:
  """Unit-norm dictionary directions; a no-op unless `decoder_norm == 'project'`."""
  if config.decoder_norm != "project":
    return params
  return {**params, "w_dec": _l2_normalize(params["w_dec"])}

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
    r_mag [F], b_mag [F]   Gated (Rajamanoharan et al. 2024a): w_enc and b_enc are the gate path;
                   the magnitude path shares w_enc, scaled per latent by exp(r_mag), with b_mag.

Forward: x_in = x/‖x‖ if `input_norm` else x; pre = (x_in − b_pre) @ w_enc + b_enc;
codes = act(pre); x_hat = codes @ dictionary + b_dec + b_pre, then x_hat/‖x_hat‖ if `recon_norm`.
x_hat lives in the SAE's space, its target is `aux['target']` (= x_in); `splice` maps back.
Sparsemax encoders, x̃ = (x_in − b_pre)/‖x_in − b_pre‖ and a_j the unit rows of `a`: `no_kds`
sparsemax(lam·x̃·a_j); `recon_dist` sparsemax(x̃·a_j − lam‖x̃ − a_j‖²); `dist`
sparsemax(−lam‖x̃ − a_j‖²); no encoder bias. JumpReLU (its straight-through gradients) and
BatchTopK (the batch selection) are described in `activations`; BatchTopK's inference threshold
is `SAEState.threshold`, an EMA of the smallest kept value (`_batch_topk_state`). Gated: codes =
1[pre > 0]·relu(pre_mag), pre_mag = (x_in − b_pre) @ w_enc · exp(r_mag) + b_mag, no gradient
through the gate; `aux['gate_acts']` = relu(pre) feeds the gated SAE's sparsity and auxiliary
terms (`gated_sparsity_codes`, `gated_aux_reconstruction`).

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

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from jaxsae.grid import active_codes
from jaxsae.grid import activations
from jaxsae.grid import sae_config

Params = dict[str, jax.Array]

# The SAE's description lives in `sae_config`; its public names are re-exported here.
ACTIVATIONS = sae_config.ACTIVATIONS
SPARSEMAX_ACTIVATIONS = sae_config.SPARSEMAX_ACTIVATIONS
DECODER_NORMS = sae_config.DECODER_NORMS
INITS = sae_config.INITS
PRE_BIAS_INITS = sae_config.PRE_BIAS_INITS
SPLICE_MODES = sae_config.SPLICE_MODES
DECODES = sae_config.DECODES
DEAD_TOKENS = sae_config.DEAD_TOKENS
SAEConfig = sae_config.SAEConfig
SAEHparams = sae_config.SAEHparams
default_hparams = sae_config.default_hparams
check_hparams = sae_config.check_hparams
SAEState = sae_config.SAEState
init_state = sae_config.init_state
config_json = sae_config.config_json
_check_choice = sae_config.check_choice

_EPS = 1e-8  # norms are clipped below at _EPS before dividing (Menon adds 1e-8)


# ------------------------------------------------------------------------------------------------
# Init.


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _safe_norm(x: jax.Array) -> jax.Array:
  # max(‖x‖, eps) with a finite gradient at x = 0 (x_hat is 0 when all latents are off).
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), _EPS**2))


def l2_normalize(x: jax.Array) -> jax.Array:
  """`x` divided by its L2 norm along the last axis (a zero row stays zero)."""
  return x / _safe_norm(x)


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
    params["a"] = l2_normalize(jax.random.normal(k_enc, (f, d), jnp.float32))
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
    params["w_dec"] = l2_normalize(params["w_dec"])
  if config.dec_bias:
    params["b_dec"] = _uniform(k_bdec, (d,), 1 / math.sqrt(f))
  if config.pre_bias:
    params["b_pre"] = _init_pre_bias(config, data_sample)
  if config.activation == "jumprelu":
    params["log_threshold"] = jnp.full((f,), jnp.log(hparams.jumprelu_init_threshold), jnp.float32)
  if config.activation == "gated":
    params["r_mag"] = jnp.zeros((f,), jnp.float32)  # the paper's init: W_mag = W_gate
    params["b_mag"] = jnp.zeros((f,), jnp.float32)
  return params


def _init_pre_bias(config: SAEConfig, data_sample: jax.Array | None) -> jax.Array:
  if config.pre_bias_init == "zero":
    return jnp.zeros((config.d_in,), jnp.float32)
  if data_sample is None:
    raise ValueError(f"SAEConfig.pre_bias_init={config.pre_bias_init!r} needs a data_sample "
                     f"[..., {config.d_in}] passed to init.")
  x_ND = jnp.asarray(data_sample, jnp.float32).reshape(-1, config.d_in)
  if config.input_norm:
    x_ND = l2_normalize(x_ND)
  return jnp.mean(x_ND, axis=0) if config.pre_bias_init == "mean" else _geometric_median(x_ND)


# ------------------------------------------------------------------------------------------------
# Encoder, decoder, forward.


def dictionary(params: Params, config: SAEConfig) -> jax.Array:
  """The decoder directions `[F, D]` as used in the forward (unit rows for `forward`)."""
  w_FD = params["w_dec"]
  return l2_normalize(w_FD) if config.decoder_norm == "forward" else w_FD


def _encoder_input(params: Params, x_in: jax.Array, config: SAEConfig) -> jax.Array:
  return x_in - activations.lead(params["b_pre"], x_in) if config.pre_bias else x_in


def _pre_acts(params: Params, x_in: jax.Array, config: SAEConfig) -> jax.Array:
  x_in = _encoder_input(params, x_in, config)
  if not config.is_sparsemax:
    pre = jnp.einsum("...d,df->...f", x_in, params["w_enc"])
    return pre + activations.lead(params["b_enc"], pre) if config.enc_bias else pre
  xt = l2_normalize(x_in)
  a_FD = l2_normalize(params["a"])
  lam = params["lam"]
  dots = jnp.einsum("...d,fd->...f", xt, a_FD)
  if config.activation == "sparsemax_no_kds":
    return lam * dots
  sq_dist = (jnp.sum(jnp.square(xt), axis=-1, keepdims=True)
             + activations.lead(jnp.sum(jnp.square(a_FD), axis=-1), dots) - 2 * dots)
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
          and config.k_max <= activations.TOPK_SORT_MAX)


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
  thr = jnp.where(any_kept, new_thr, state.threshold).astype(jnp.float32)
  return state.replace(threshold=thr, count=state.count + any_kept.astype(jnp.int32))


def gated_sparsity_codes(params: Params, gate_acts: jax.Array, config: SAEConfig) -> jax.Array:
  """What a gated SAE's sparsity penalises: relu(gate pre-activations) · ‖dictionary row‖."""
  norms_F = jnp.linalg.norm(dictionary(params, config), axis=-1)
  return gate_acts * activations.lead(norms_F, gate_acts)


def gated_aux_reconstruction(params: Params, gate_acts: jax.Array, config: SAEConfig
                             ) -> jax.Array:
  """The gate path's own reconstruction through a frozen decoder (dictionary, b_dec, b_pre
  under stop_gradient): the gated SAE's auxiliary term trains w_enc / b_enc through it."""
  frozen = {k: jax.lax.stop_gradient(v) if k in ("w_dec", "b_dec", "b_pre") else v
            for k, v in params.items()}
  return decode(frozen, gate_acts, config)


def dead_latents(state: SAEState, hparams: SAEHparams) -> jax.Array:
  """AuxK's dead latents, bool `[F]`: not fired for `hparams.dead_tokens` training tokens."""
  return state.since_fired >= hparams.dead_tokens


def update_since_fired(state: SAEState, fired_F: jax.Array, n_tokens: jax.Array) -> SAEState:
  """Counts a training step's `n_tokens` tokens for every latent, back to 0 where it fired
  (bool `[F]`); saturates at `sae_config.SINCE_FIRED_MAX`. Under stop_gradient."""
  since = jnp.minimum(state.since_fired, sae_config.SINCE_FIRED_MAX - n_tokens) + n_tokens
  since = jnp.where(fired_F, 0, since).astype(jnp.int32)
  return state.replace(since_fired=jax.lax.stop_gradient(since))


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
    codes = activations.topk(pre, hparams.k, config.k_max)
  elif act == "batchtopk":
    thr_codes = jax.nn.relu(pre) * (pre > state.threshold).astype(pre.dtype)
    if train:
      codes, min_kept, any_kept = activations.batch_topk(pre, hparams.k, config.k_max, mask)
      if mask is not None:
        codes = jnp.where(jnp.broadcast_to(mask, pre.shape[:-1])[..., None], codes, thr_codes)
      state = _batch_topk_state(state, hparams, min_kept, any_kept)
    else:
      codes = thr_codes
  elif act == "jumprelu":
    theta = jnp.exp(params["log_threshold"])
    codes = activations.jumprelu(pre, theta, hparams.jumprelu_bandwidth)
    aux["gates"] = activations.heaviside_ste(pre, theta, hparams.jumprelu_bandwidth)
  elif act == "gated":
    x_enc = _encoder_input(params, x_in, config)
    pre_mag = jnp.einsum("...d,df->...f", x_enc, params["w_enc"])
    pre_mag = (pre_mag * activations.lead(jnp.exp(params["r_mag"]), pre_mag)
               + activations.lead(params["b_mag"], pre_mag))
    codes = activations.gated(pre, pre_mag)
    aux["gate_acts"] = jax.nn.relu(pre)
  else:
    codes = activations.sparsemax(pre)
  aux["state"] = state
  return codes, aux


def encode(params: Params, x: jax.Array, config: SAEConfig, hparams: SAEHparams, *,
           state: SAEState | None = None, train: bool = False,
           mask: jax.Array | None = None) -> jax.Array:
  """Codes `[..., F]` of raw `x` `[..., D]` (applies `input_norm`); other args as `forward`."""
  chex.assert_axis_dimension(x, -1, config.d_in)
  x_in = l2_normalize(x) if config.input_norm else x
  return _encode(params, x_in, config, hparams, state, train, mask)[0]


def decode(params: Params, codes: jax.Array, config: SAEConfig) -> jax.Array:
  """`codes @ dictionary + b_dec + b_pre`, L2-normalised if `recon_norm`; `[..., F] -> [..., D]`."""
  chex.assert_axis_dimension(codes, -1, config.width)
  return _decode_tail(params, jnp.einsum("...f,fd->...d", codes, dictionary(params, config)),
                      config)


def decode_prefix(params: Params, codes: jax.Array, config: SAEConfig, m: int) -> jax.Array:
  """`decode` from the first `m` latents only (static m; a Matryoshka prefix)."""
  chex.assert_axis_dimension(codes, -1, config.width)
  x_hat = jnp.einsum("...f,fd->...d", codes[..., :m], dictionary(params, config)[:m])
  return _decode_tail(params, x_hat, config)


def _decode_tail(params: Params, x_hat: jax.Array, config: SAEConfig) -> jax.Array:
  if config.dec_bias:
    x_hat = x_hat + activations.lead(params["b_dec"], x_hat)
  if config.pre_bias:
    x_hat = x_hat + activations.lead(params["b_pre"], x_hat)
  return l2_normalize(x_hat) if config.recon_norm else x_hat


def _forward(params, x, config, hparams, state, train, mask, normalize_input):
  chex.assert_axis_dimension(x, -1, config.d_in)
  x_in = l2_normalize(x) if normalize_input else x
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
    BatchTopK training mode, else as given), `gates` (JumpReLU's L0 surrogate) for JumpReLU,
    `gate_acts` (relu of the gate pre-activations) for gated SAEs, and `active`
    (`active_codes.ActiveCodes` of the codes, flattened over the leading axes) when
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
  u = l2_normalize(params["w_dec"])
  g = grads["w_dec"]
  return {**grads, "w_dec": g - jnp.sum(g * u, axis=-1, keepdims=True) * u}


def renormalize(params: Params, config: SAEConfig) -> Params:
  """Unit-norm dictionary directions; a no-op unless `decoder_norm == 'project'`."""
  if config.decoder_norm != "project":
    return params
  return {**params, "w_dec": l2_normalize(params["w_dec"])}

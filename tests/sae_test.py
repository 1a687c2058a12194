"""Tests for jaxsae.grid.sae: config validation, inits, activations and their gradients, decoder norms,
splicing modes, and vmap equivalence over variants for every activation."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsae.grid import activations
from jaxsae.grid import resample as resample_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sae_config
from jaxsae.lm import model as model_lib

D, F = 8, 24

# Tests compile many tiny programs once each: XLA's backend optimisations cost more than they save.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})

# Jitted entry points: one small compile per (config, shape) is much cheaper than eager dispatch.
_init = _jit(sae_lib.init, static_argnames=("config",))
_fwd = _jit(sae_lib.forward, static_argnames=("config", "train"))
_splice = _jit(sae_lib.splice, static_argnames=("config", "mode"))


def _config(activation="relu", **kwargs):
  # menon init unless a test needs e2e: the orthogonal init's QR is slow to compile on CPU.
  kwargs.setdefault("init", "menon")
  if activation in ("topk", "batchtopk"):
    kwargs.setdefault("k_max", 6)
  if activation in sae_lib.SPARSEMAX_ACTIVATIONS:
    kwargs.setdefault("enc_bias", False)
  return sae_lib.SAEConfig(d_in=D, width=F, activation=activation, **kwargs)


def _x(shape=(3, 5), key=1, scale=2.0):
  return jnp.asarray(scale * _randn(key, shape + (D,)))


def _randn(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _key(seed):
  # rbg keys: much cheaper to compile on CPU than threefry; any typed key works for init.
  return jax.random.key(seed, impl="rbg")


def _structure(config):
  """A config with the same params structure; tests other than init share its (cached) params,
  since init is the costliest compile here."""
  family = ("relu" if config.activation in ("relu", "topk", "batchtopk") else
            "sparsemax_dist" if config.is_sparsemax else config.activation)
  return dataclasses.replace(config, activation=family, k_max=None, decoder_norm="forward",
                             input_norm=False, recon_norm=False, init="menon",
                             pre_bias_init="zero", decode="auto")


@functools.lru_cache(maxsize=None)
def _cached_params(structure, seed):
  return _init(_key(seed), structure)


def _params(config, seed=0):
  return dict(_cached_params(_structure(config), seed))


@functools.lru_cache(maxsize=None)
def _cached_stacked_params(structure):
  return _jit(jax.vmap(functools.partial(sae_lib.init, config=structure)))(
      jax.random.split(_key(0), 3))


# ------------------------------------------------------------------------------------------------
# Config and hparams validation.


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="gelu"), "SAEConfig.activation"),
    (dict(activation="topk", k_max=F + 1), "k_max=25 exceeds width"),
    (dict(activation="topk"), "SAEConfig.k_max must be a positive int"),
    (dict(activation="batchtopk", k_max=0), "SAEConfig.k_max must be a positive int"),
    (dict(activation="relu", k_max=4), "k_max only applies"),
    (dict(activation="sparsemax_dist"), "SAEConfig.enc_bias must be False"),
    (dict(decoder_norm="unit"), "SAEConfig.decoder_norm"),
    (dict(init="xavier"), "SAEConfig.init"),
    (dict(pre_bias_init="mean"), "needs pre_bias=True"),
    (dict(pre_bias_init="mode", pre_bias=True), "SAEConfig.pre_bias_init"),
    (dict(width=4), "init='e2e' needs width >= d_in"),
    (dict(d_in=0), "SAEConfig.d_in must be a positive int"),
    (dict(input_norm=1), "SAEConfig.input_norm must be a bool"),
    (dict(p_anneal=1), "SAEConfig.p_anneal must be a bool"),
    (dict(decode="gather"), "SAEConfig.decode"),
    (dict(decode="sparse"), "decode='sparse' needs a topk/batchtopk"),
])
def test_config_validation(kwargs, match):
  base = dict(d_in=D, width=F)
  with pytest.raises(ValueError, match=match):
    sae_lib.SAEConfig(**{**base, **kwargs})


def test_config_is_hashable_and_menon_narrow_ok():
  assert hash(_config("topk")) == hash(_config("topk"))
  sae_lib.SAEConfig(d_in=D, width=4, init="menon")  # e2e's width constraint only


@pytest.mark.parametrize("overrides,match", [
    (dict(k=7), r"SAEHparams.k must lie in \[1, k_max=6\]"),
    (dict(k=0), r"SAEHparams.k must lie"),
    (dict(jumprelu_bandwidth=0.0), "SAEHparams.jumprelu_bandwidth"),
    (dict(threshold_decay=1.0), "SAEHparams.threshold_decay"),
])
def test_hparams_validation(overrides, match):
  config = _config("topk")
  sae_lib.check_hparams(sae_lib.default_hparams(config), config)
  with pytest.raises(ValueError, match=match):
    sae_lib.check_hparams(sae_lib.default_hparams(config, **overrides), config)
  with pytest.raises(ValueError, match="Unknown SAEHparams"):
    sae_lib.default_hparams(config, kk=1)


# ------------------------------------------------------------------------------------------------
# Init.


def _assert_uniform(w, bound):
  w = np.asarray(w).ravel()
  assert np.abs(w).max() <= bound
  assert np.abs(w).max() > 0.98 * bound  # fills the interval
  # std of U(±b) is b/√3; sample std of n draws has relative SE ~ 0.9/√n.
  np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=6 * 0.9 / math.sqrt(w.size))
  assert abs(w.mean()) < 6 * bound / math.sqrt(3 * w.size)


def test_init_e2e_statistics_and_orthogonality():
  d, f = 64, 256
  config = sae_lib.SAEConfig(d_in=d, width=f)
  params = _init(_key(0), config)
  assert set(params) == {"w_enc", "b_enc", "w_dec", "b_dec"}
  assert params["w_enc"].shape == (d, f) and params["w_dec"].shape == (f, d)
  _assert_uniform(params["w_enc"], 1 / math.sqrt(d))
  _assert_uniform(params["b_enc"], 1 / math.sqrt(d))
  _assert_uniform(params["b_dec"], 1 / math.sqrt(f))
  w_dec_DF = np.asarray(params["w_dec"]).T  # the spec's d x F W_dec
  np.testing.assert_allclose(w_dec_DF @ w_dec_DF.T, np.eye(d), atol=1e-5)


def test_init_menon():
  d, f = 64, 256
  base = sae_lib.SAEConfig(d_in=d, width=f, init="menon", enc_bias=False, dec_bias=False,
                           decoder_norm="none")
  params = _init(_key(1), base)
  assert set(params) == {"w_enc", "w_dec"}
  _assert_uniform(params["w_enc"], 1 / math.sqrt(d))
  _assert_uniform(params["w_dec"], 1 / math.sqrt(f))
  params = _init(_key(1), dataclasses.replace(base, decoder_norm="forward"))
  np.testing.assert_allclose(np.std(params["w_dec"]), 1.0, rtol=0.05)  # randn
  params = _init(_key(1), dataclasses.replace(base, decoder_norm="project"))
  np.testing.assert_allclose(np.linalg.norm(params["w_dec"], axis=-1), 1.0, rtol=1e-5)


def test_init_sparsemax():
  # (JumpReLU's threshold init is checked in the vmap test, from stacked hparams.)
  params = _jit(jax.vmap(lambda k: sae_lib.init(k, _config("sparsemax_recon_dist"))))(
      jax.random.split(_key(3), 1000))
  assert "w_enc" not in params and "b_enc" not in params
  assert params["a"].shape == (1000, F, D) and params["lam"].shape == (1000,)
  np.testing.assert_allclose(np.linalg.norm(params["a"], axis=-1), 1.0, rtol=1e-5)
  assert np.all(params["lam"] >= 0)
  np.testing.assert_allclose(np.mean(params["lam"]), 1.0, atol=0.27)  # E[randn²] = 1, SE 0.045


def test_pre_bias_data_init():
  x = _randn(4, (400, D)) + 3.0
  x[:20] += 1000.0  # outliers: move the mean, not the geometric median
  mean_cfg = _config(pre_bias=True, pre_bias_init="mean")
  np.testing.assert_allclose(_init(_key(0), mean_cfg, x)["b_pre"], x.mean(0),
                             rtol=1e-5)
  med = np.asarray(_init(_key(0), _config(pre_bias=True, pre_bias_init="median"),
                                jnp.asarray(x.reshape(20, 20, D)))["b_pre"])
  unit = (x - med) / np.linalg.norm(x - med, axis=-1, keepdims=True)
  assert np.linalg.norm(unit.sum(0)) < 0.05 * len(x)  # optimality: unit vectors sum to ~0
  assert np.all(np.abs(med - 3.0) < 0.5)
  np.testing.assert_array_equal(_params(_config(pre_bias=True))["b_pre"], 0.0)
  with pytest.raises(ValueError, match="needs a data_sample"):
    _init(_key(0), mean_cfg)


# ------------------------------------------------------------------------------------------------
# Forward: formula, decoder norms.


def test_forward_formula_and_decode_encode():
  config = _config(pre_bias=True, decoder_norm="none")
  params = _params(config)
  params["b_pre"] = jnp.asarray(_randn(9, (D,)))
  hp = sae_lib.default_hparams(config)
  x = _x()
  x_hat, codes, aux = _fwd(params, x, config, hp)
  p = {k: np.asarray(v) for k, v in params.items()}
  c = np.maximum((np.asarray(x) - p["b_pre"]) @ p["w_enc"] + p["b_enc"], 0)
  np.testing.assert_allclose(codes, c, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat, c @ p["w_dec"] + p["b_dec"] + p["b_pre"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae_lib.decode(params, sae_lib.encode(params, x, config, hp), config),
                             x_hat, rtol=1e-6)
  np.testing.assert_array_equal(aux["target"], x)


def test_forward_decoder_norm_is_scale_invariant():
  x = _x()
  for norm, invariant in (("forward", True), ("none", False)):
    config = _config(decoder_norm=norm)
    params = _params(config)
    hp = sae_lib.default_hparams(config)
    scaled = {**params, "w_dec": params["w_dec"].at[3].multiply(3.7).at[10].multiply(0.2)}
    same = np.allclose(_fwd(params, x, config, hp)[0],
                       _fwd(scaled, x, config, hp)[0], rtol=1e-5, atol=1e-6)
    assert same == invariant, norm
  np.testing.assert_allclose(
      np.linalg.norm(sae_lib.dictionary(scaled, _config(decoder_norm="forward")), axis=-1), 1.0,
      rtol=1e-5)


def test_zero_reconstruction_has_finite_gradients():
  # All latents off and no biases: x_hat = 0 exactly, which recon_norm must survive.
  config = _config(input_norm=True, recon_norm=True)
  params = {**_params(config), "w_enc": jnp.zeros((D, F)), "b_enc": jnp.zeros((F,)),
            "b_dec": jnp.zeros((D,))}
  x = _x()
  hp = sae_lib.default_hparams(config)
  grads = _jit(jax.grad(lambda p: jnp.sum(sae_lib.splice(p, x, config, hp)[0])))(params)
  assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_project_gradients_and_renormalize():
  config = _config(decoder_norm="project")
  params = _params(config)
  params = {**params, "w_dec": params["w_dec"] * 1.5}  # also works off the unit sphere
  grads = jax.tree.map(lambda p: jnp.asarray(_randn(5, p.shape)), params)
  projected = sae_lib.project_gradients(params, grads, config)
  u = params["w_dec"] / jnp.linalg.norm(params["w_dec"], axis=-1, keepdims=True)
  np.testing.assert_allclose(jnp.sum(projected["w_dec"] * u, -1), 0.0, atol=1e-5)
  assert np.linalg.norm(projected["w_dec"] - grads["w_dec"]) > 0.1
  np.testing.assert_array_equal(projected["w_enc"], grads["w_enc"])
  renormed = sae_lib.renormalize(params, config)
  np.testing.assert_allclose(np.linalg.norm(renormed["w_dec"], axis=-1), 1.0, rtol=1e-6)
  # Stacked [N, F, D] params, and no-ops for other norms.
  stacked = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params)
  np.testing.assert_allclose(
      np.linalg.norm(sae_lib.renormalize(stacked, config)["w_dec"], axis=-1), 1.0, rtol=1e-6)
  other = _config(decoder_norm="forward")
  assert sae_lib.project_gradients(params, grads, other) is grads
  assert sae_lib.renormalize(params, other) is params


# ------------------------------------------------------------------------------------------------
# Activations.


def test_topk_keeps_exactly_the_k_largest():
  config = _config("topk")
  params = _params(config)
  x = _x((4, 7))
  for k in (1, 3, 6):
    hp = sae_lib.default_hparams(config, k=k)
    _, codes, aux = _fwd(params, x, config, hp)
    codes, pre = np.asarray(codes).reshape(-1, F), np.asarray(aux["pre_acts"]).reshape(-1, F)
    for c, z in zip(codes, pre):
      expected_n = min(k, int((z > 0).sum()))
      assert (c != 0).sum() == expected_n
      top = np.argsort(-z)[:expected_n]
      np.testing.assert_array_equal(np.sort(np.nonzero(c)[0]), np.sort(top))
      np.testing.assert_array_equal(c[top], z[top])
  # Fewer positives than k: only the positives survive.
  z = jnp.array([[3.0, -1.0, 2.0, -4.0, -0.5]])
  np.testing.assert_array_equal(activations.topk(z, jnp.int32(3), 4), [[3.0, 0, 2.0, 0, 0]])


def test_batchtopk_training_and_inference():
  config = _config("batchtopk")
  params = _params(config)
  hp = sae_lib.default_hparams(config, k=2, threshold_decay=0.75)
  x = _x((3, 4))
  n_tokens = 12
  _, codes, aux = _fwd(params, x, config, hp, train=True)
  pre = np.asarray(aux["pre_acts"]).ravel()
  c = np.asarray(codes).ravel()
  assert (c != 0).sum() == 2 * n_tokens and (pre > 0).sum() > 2 * n_tokens
  top = np.argsort(-pre)[:2 * n_tokens]
  np.testing.assert_array_equal(c[top], pre[top])
  assert (np.asarray(codes) != 0).sum(-1).std() > 0  # per-token counts vary: a batch budget
  state = aux["state"]
  m1 = pre[top].min()
  np.testing.assert_allclose(state.threshold, m1, rtol=1e-6)
  assert int(state.count) == 1
  # Second step: EMA with decay 0.75 (asymmetric, so swapping decay and 1 − decay shows).
  x2 = _x((3, 4), key=2)
  _, _, aux2 = _fwd(params, x2, config, hp, state=state, train=True)
  m2 = np.sort(np.asarray(aux2["pre_acts"]).ravel())[-2 * n_tokens]
  np.testing.assert_allclose(aux2["state"].threshold, 0.75 * m1 + 0.25 * m2, rtol=1e-5)
  # Inference: per-token threshold, state unchanged.
  _, inf_codes, aux3 = _fwd(params, x2, config, hp, state=state)
  z = np.asarray(aux3["pre_acts"])
  np.testing.assert_array_equal(inf_codes, np.where(z > m1, z, 0))
  np.testing.assert_array_equal(aux3["state"].threshold, state.threshold)
  # Masked: the budget is k per masked-in token, masked-out tokens use the threshold.
  mask = jnp.array([[True, True, False, False]] * 3)
  _, mcodes, maux = _fwd(params, x, config, hp, train=True, mask=mask,
                                    state=aux2["state"])
  assert (np.asarray(mcodes)[np.asarray(mask)] != 0).sum() == 2 * 6
  zz = np.asarray(maux["pre_acts"])[~np.asarray(mask)]
  np.testing.assert_array_equal(np.asarray(mcodes)[~np.asarray(mask)],
                                np.where(zz > aux2["state"].threshold, zz, 0))


def test_jumprelu_ste_matches_documented_formula():
  z = jnp.array([[0.5, 0.8, 1.0, 1.2, 1.3, 2.0], [0.9, 1.1, -1.0, 1.24, 0.76, 0.7]])
  theta = jnp.full((6,), 1.0).at[5].set(0.8)
  eps = jnp.float32(0.5)  # window: |z − theta| < 0.25
  w = jnp.asarray(_randn(0, z.shape))
  zn, tn, wn = np.asarray(z), np.asarray(theta), np.asarray(w)
  rect = (np.abs((zn - tn) / 0.5) < 0.5).astype(np.float32)
  gate = (zn > tn).astype(np.float32)
  np.testing.assert_array_equal(activations.jumprelu(z, theta, eps), zn * gate)
  gz, gt = _jit(jax.grad(lambda z, t: jnp.sum(w * activations.jumprelu(z, t, eps)), (0, 1)))(
      z, theta)
  np.testing.assert_allclose(gz, wn * gate)
  np.testing.assert_allclose(gt, np.sum(-wn * tn / 0.5 * rect, 0), rtol=1e-6)
  assert np.count_nonzero(rect) >= 6 and np.count_nonzero(rect) < rect.size
  gz, gt = _jit(jax.grad(lambda z, t: jnp.sum(w * activations.heaviside_ste(z, t, eps)), (0, 1)))(
      z, theta)
  np.testing.assert_array_equal(gz, 0.0)
  np.testing.assert_allclose(gt, np.sum(-wn / 0.5 * rect, 0), rtol=1e-6)

  # Through the SAE: gradient w.r.t. log_threshold = theta · d/dtheta.
  config = _config("jumprelu")
  hp = sae_lib.default_hparams(config, jumprelu_bandwidth=0.3)
  params = _params(config)
  params["log_threshold"] = jnp.log(jnp.linspace(0.1, 1.5, F))
  x = _x((2, 6))
  g_out = jnp.asarray(_randn(3, (2, 6, F)))
  def loss(p):
    _, codes, aux = sae_lib.forward(p, x, config, hp)
    return jnp.sum(g_out * codes) + jnp.sum(aux["gates"])
  grad = _jit(jax.grad(loss))(params)["log_threshold"]
  zz = np.asarray(_fwd(params, x, config, hp)[2]["pre_acts"])
  th = np.exp(np.asarray(params["log_threshold"]))
  r = (np.abs((zz - th) / 0.3) < 0.5)
  expected = th * np.sum((-np.asarray(g_out) * th / 0.3 - 1 / 0.3) * r, axis=(0, 1))
  assert np.count_nonzero(expected) > 3
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def _sparsemax_reference(z):
  """Bisection on tau with Σ max(z − tau, 0) = 1 (independent of the sorting algorithm)."""
  z = np.asarray(z, np.float64)
  lo, hi = z.min(-1, keepdims=True) - 1, z.max(-1, keepdims=True)
  for _ in range(100):
    mid = (lo + hi) / 2
    big = np.maximum(z - mid, 0).sum(-1, keepdims=True) > 1
    lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
  return np.maximum(z - (lo + hi) / 2, 0)


def test_sparsemax_values_and_jacobian():
  z = 1.5 * jnp.asarray(_randn(0, (4, 3, 10)))
  p = np.asarray(_jit(activations.sparsemax)(z))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  assert p.min() >= 0 and (p == 0).any() and ((p > 0).sum(-1) > 1).any()
  np.testing.assert_allclose(p, _sparsemax_reference(z), atol=1e-5)
  np.testing.assert_allclose(activations.sparsemax(jnp.array([0.2, 5.0, 0.1])), [0, 1, 0])

  zv = jnp.array([0.9, 0.3, 1.1, -0.7, 0.6, 0.05])
  jac_fwd = np.asarray(_jit(jax.jacfwd(activations.sparsemax))(zv))
  jac_rev = np.asarray(_jit(jax.jacrev(activations.sparsemax))(zv))
  h = 1e-3
  fd = np.stack([(_sparsemax_reference(zv + h * e) - _sparsemax_reference(zv - h * e)) / (2 * h)
                 for e in np.eye(6)], axis=1)
  assert np.abs(fd).max() > 0.1
  np.testing.assert_allclose(jac_fwd, fd, atol=1e-3)
  np.testing.assert_allclose(jac_rev, fd, atol=1e-3)


@pytest.mark.parametrize("activation", sae_lib.SPARSEMAX_ACTIVATIONS)
def test_sparsemax_encoders_formula(activation):
  config = _config(activation, pre_bias=True)
  params = _params(config)
  params["a"] = params["a"] * 2.0  # normalised in the forward
  params["b_pre"] = 0.3 * jnp.ones((D,))
  hp = sae_lib.default_hparams(config)
  x = _x((2, 3))
  _, codes, aux = _fwd(params, x, config, hp)
  xt = np.asarray(x) - 0.3
  xt /= np.linalg.norm(xt, axis=-1, keepdims=True)
  a = np.asarray(params["a"]) / np.linalg.norm(params["a"], axis=-1, keepdims=True)
  lam = float(params["lam"])
  dots = xt @ a.T
  dist = ((xt[..., None, :] - a) ** 2).sum(-1)
  pre = {"sparsemax_no_kds": lam * dots, "sparsemax_recon_dist": dots - lam * dist,
         "sparsemax_dist": -lam * dist}[activation]
  np.testing.assert_allclose(aux["pre_acts"], pre, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(codes, _sparsemax_reference(pre), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Splicing.


def test_splice_modes():
  config = _config(input_norm=True, recon_norm=True)
  params = _params(config)
  hp = sae_lib.default_hparams(config)
  x = _x(scale=5.0)
  norms = np.linalg.norm(x, axis=-1)
  out, _, _ = _splice(params, x, config, hp, mode="corrected")
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), norms, rtol=1e-5)
  np.testing.assert_allclose(out, _fwd(params, x, config, hp)[0] * norms[..., None],
                             rtol=1e-5)
  raw = dataclasses.replace(config, input_norm=False)
  orig, _, _ = _splice(params, x, config, hp, mode="original")
  np.testing.assert_allclose(np.linalg.norm(orig, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(orig, _fwd(params, x, raw, hp)[0], rtol=1e-6)
  assert not np.allclose(orig, _fwd(params, x, config, hp)[0], atol=1e-3)
  # input_norm only: corrected is scale-equivariant; without norms both modes are the forward.
  in_only = dataclasses.replace(config, recon_norm=False)
  a = _splice(params, x, in_only, hp)[0]
  np.testing.assert_allclose(_splice(params, 3 * x, in_only, hp)[0], 3 * a, rtol=1e-4)
  plain = _config()
  for mode in sae_lib.SPLICE_MODES:
    np.testing.assert_array_equal(_splice(params, x, plain, hp, mode=mode)[0],
                                  _fwd(params, x, plain, hp)[0])
  with pytest.raises(ValueError, match="splice mode"):
    sae_lib.splice_fn(params, config, hp, mode="fixed")


def test_splice_mask_and_model_integration():
  mconfig = model_lib.ModelConfig(vocab_size=7, n_layers=2, n_heads=2, d_model=D, d_mlp=16,
                                  context=8)
  mparams = model_lib.init(_key(0), mconfig)
  tokens_BT = jnp.asarray(np.random.default_rng(1).integers(0, 7, (2, 6)), jnp.int32)
  config = _config(input_norm=True)
  params = _params(config)
  hp = sae_lib.default_hparams(config)
  mask_BT = jnp.arange(6)[None] >= jnp.array([[2], [4]])
  site = "resid_post.0"

  @_jit
  def run(mparams, params, hp):
    fn = sae_lib.splice_fn(params, config, hp, mask=mask_BT)
    res = model_lib.apply(mparams, tokens_BT, mconfig, replace={site: fn}, collect=[site])
    clean_x = model_lib.apply(mparams, tokens_BT, mconfig, stop_at=site).acts[site]
    expected = sae_lib.splice(params, clean_x, config, hp, mask=mask_BT)[0]
    from_site = model_lib.apply_from(mparams, site, expected, mconfig)
    return res.acts[site], res.logits, clean_x, expected, from_site.logits

  spliced, logits, clean_x, expected, from_site_logits = run(mparams, params, hp)
  m = np.asarray(mask_BT)
  np.testing.assert_array_equal(np.asarray(spliced)[~m], np.asarray(clean_x)[~m])
  assert not np.allclose(np.asarray(spliced)[m], np.asarray(clean_x)[m], atol=1e-3)
  np.testing.assert_allclose(spliced, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, from_site_logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# vmap over variants.


@pytest.mark.parametrize("activation, decode", [(a, "auto") for a in sae_lib.ACTIVATIONS]
                         + [("topk", "dense"), ("batchtopk", "sparse")])
def test_vmap_over_variants_equals_separate_calls(activation, decode):
  config = _config(activation, decoder_norm="forward", decode=decode)
  hps = [sae_lib.default_hparams(config, k=k, jumprelu_bandwidth=bw, threshold_decay=dec)
         if config.uses_k else
         sae_lib.default_hparams(config, jumprelu_bandwidth=bw, jumprelu_init_threshold=0.1 * bw)
         for k, bw, dec in ((2, 0.5, 0.9), (4, 1.0, 0.5), (5, 2.0, 0.0))]
  hp_N = jax.tree.map(lambda *v: jnp.stack(v), *hps)
  if activation == "jumprelu":  # init from stacked hparams (per-variant initial thresholds)
    params_N = _jit(jax.vmap(functools.partial(sae_lib.init, config=config)))(
        jax.random.split(_key(0), 3), hparams=hp_N)
    np.testing.assert_allclose(np.exp(params_N["log_threshold"][:, 0]), [0.05, 0.1, 0.2],
                               rtol=1e-6)
  else:
    params_N = _cached_stacked_params(_structure(config))
  x = _x((2, 5))
  # A state past its first update, so BatchTopK's EMA (decays 0.9 / 0.5 / 0) takes part.
  state0 = sae_lib.SAEState(threshold=jnp.float32(0.3), count=jnp.int32(1))
  state_N = jax.tree.map(lambda s: jnp.stack([s] * 3), state0)

  def loss(params, x, hp, state):
    x_hat, codes, aux = sae_lib.forward(params, x, config, hp, state=state, train=True)
    return jnp.sum((x_hat - x) ** 2) + jnp.sum(codes), (x_hat, codes, aux["state"])

  grad_fn = jax.grad(loss, has_aux=True)
  g_N, (xh_N, c_N, s_N) = _jit(jax.vmap(grad_fn, in_axes=(0, None, 0, 0)))(
      params_N, x, hp_N, state_N)
  grad_fn = _jit(grad_fn)
  for i in range(3):
    params_i = jax.tree.map(lambda p: p[i], params_N)
    g, (xh, c, s) = grad_fn(params_i, x, hps[i], state0)
    np.testing.assert_allclose(xh_N[i], xh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_N[i], c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_N.threshold[i], s.threshold, rtol=1e-6)
    for name in g:
      np.testing.assert_allclose(g_N[name][i], g[name], rtol=1e-4, atol=1e-5, err_msg=name)
  if config.uses_k:  # the variants really differ in k
    counts = (np.asarray(c_N) != 0).sum(axis=(1, 2, 3))
    assert len(set(counts.tolist())) == 3


@pytest.mark.parametrize("k_max", [8, 40])  # lax.top_k path and bisection path
def test_topk_paths_keep_the_k_largest_with_dynamic_k(k_max):
  rng = np.random.default_rng(3)
  z = rng.normal(size=(6, 64)).astype(np.float32)
  z[0, :60] = -1.0  # a row with 4 positive values
  for k in (1, 5, k_max):
    codes = np.asarray(activations.topk(jnp.asarray(z), jnp.int32(k), k_max))
    for c, row in zip(codes, z):
      n = min(k, int((row > 0).sum()))
      top = np.argsort(-row)[:n]
      assert (c != 0).sum() == n
      np.testing.assert_array_equal(c[top], row[top])
  # Gradients reach exactly the kept entries.
  g = jax.grad(lambda p: jnp.sum(activations.topk(p, jnp.int32(5), k_max) * 2.0))(jnp.asarray(z))
  kept = np.asarray(activations.topk(jnp.asarray(z), jnp.int32(5), k_max)) != 0
  np.testing.assert_array_equal(np.asarray(g) != 0, kept)


# ------------------------------------------------------------------------------------------------
# Sparse decode (active latents only) against the dense decode.


def _tied_params(config, seed):
  """Params whose encoder has repeated columns and repeated-magnitude entries: tied
  pre-activations within every token."""
  params = dict(_cached_params(_structure(config), seed))
  w = np.asarray(params["w_enc"]).copy()
  w[:, 1::3] = w[:, 0::3][:, : w[:, 1::3].shape[1]]  # latents 3i and 3i+1 tie everywhere
  params["w_enc"] = jnp.asarray(w)
  if "b_enc" in params:
    b = np.asarray(params["b_enc"]).copy()
    b[1::3] = b[0::3][: b[1::3].shape[0]]
    params["b_enc"] = jnp.asarray(b)
  return params


@functools.lru_cache(maxsize=None)
def _decode_pair_fn(config, train, masked):
  def loss(params, x, hp, state, mask):
    x_hat, codes, aux = sae_lib.forward(params, x, config, hp, state=state, train=train,
                                        mask=mask if masked else None)
    w = jnp.ones(x.shape[:-1]) if not masked else mask.astype(jnp.float32)
    # A loss that weighs every output and code entry differently (catches any swapped entry).
    value = (jnp.sum(w[..., None] * jnp.sin(3 * x_hat)) + jnp.sum(w[..., None] * codes ** 2)
             + jnp.sum(jnp.cos(codes) * w[..., None]))
    return value, (x_hat, codes, aux["state"], "active" in aux)
  return _jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=())


@pytest.mark.parametrize("activation, k_max, k, extra", [
    ("topk", 6, 4, {}),
    ("topk", 6, 6, {}),
    ("topk", F, F, {}),  # k = F: every positive latent kept
    ("topk", F, 1, dict(pre_bias=True, input_norm=True, recon_norm=True, decoder_norm="none")),
    ("topk", 5, 3, dict(enc_bias=False, decoder_norm="project")),
    ("batchtopk", 6, 4, {}),
    ("batchtopk", F, F, dict(pre_bias=True)),
    ("batchtopk", 3, 2, dict(enc_bias=False, input_norm=True)),
])
@pytest.mark.parametrize("ties", [False, True])
def test_sparse_decode_equals_dense_decode(activation, k_max, k, extra, ties):
  """Same reconstruction, codes, state and gradients (params and input) from the active latents
  alone as from the dense product, including k = F, tied pre-activations and token masks."""
  results = {}
  for decode in ("dense", "sparse"):
    config = _config(activation, k_max=k_max, decode=decode, **extra)
    params = _tied_params(config, 3) if ties else _params(config, 3)
    hp = sae_lib.default_hparams(config, k=k, threshold_decay=0.5)
    state = sae_lib.SAEState(threshold=jnp.float32(0.2), count=jnp.int32(1))
    for shape in ((3, 5), (7,)):
      x = _x(shape, key=4)
      mask = jnp.asarray(np.random.default_rng(5).random(shape) < 0.6)
      for masked in (False, True):
        fn = _decode_pair_fn(config, True, masked)
        (value, (x_hat, codes, new_state, used)), grads = fn(params, x, hp, state, mask)
        assert used == (decode == "sparse")
        results.setdefault((shape, masked), []).append(
            (value, x_hat, codes, new_state, grads, np.asarray(mask)))
  for (shape, masked), (dense, sparse) in results.items():
    rows = sparse[5] if masked and activation == "batchtopk" else np.ones(shape, bool)
    # (Sparse BatchTopK leaves masked-out tokens' codes at zero: they take no part in a loss.)
    np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sparse[1])[rows], np.asarray(dense[1])[rows],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sparse[2])[rows], np.asarray(dense[2])[rows])
    np.testing.assert_array_equal(sparse[3].threshold, dense[3].threshold)
    for a, b in zip(jax.tree.leaves(sparse[4]), jax.tree.leaves(dense[4])):
      # float32 sums in another order: 1e-5 of the gradient's scale (entries reach ~100).
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))
    if ties and k > 1:  # the ties were real: some token keeps two equal codes
      rows_F = np.asarray(dense[2]).reshape(-1, F)
      assert any(len(set(r[r > 0].tolist())) < (r > 0).sum() for r in rows_F)


def test_sparse_decode_for_inference_and_auto_choice():
  """TopK decodes sparsely at inference too; BatchTopK at inference thresholds (dense); `auto`
  on CPU: sparse for TopK with k_max <= 32 only."""
  for activation, k_max, train, expected in (("topk", 6, False, True),
                                             ("batchtopk", 6, False, False),
                                             ("batchtopk", 6, True, False),
                                             ("relu", None, True, False)):
    config = _config(activation, k_max=k_max)
    assert sae_lib.sparse_decode(config, train) == (expected and jax.default_backend() == "cpu")
  big = sae_lib.SAEConfig(d_in=D, width=64, activation="topk", k_max=40, init="menon")
  assert not sae_lib.sparse_decode(big, True)
  assert sae_lib.sparse_decode(dataclasses.replace(big, decode="sparse"), True)
  # Bisection (dense, k_max > 32) and top_k (sparse) select the same latents without ties.
  params = _init(_key(2), big)
  hp = sae_lib.default_hparams(big, k=33)
  x = _x((2, 3), key=6)
  _, dense_codes, _ = _fwd(params, x, big, hp)
  x_hat, sparse_codes, aux = _fwd(params, x, dataclasses.replace(big, decode="sparse"), hp)
  np.testing.assert_array_equal(sparse_codes, dense_codes)
  np.testing.assert_allclose(x_hat, sae_lib.decode(params, dense_codes, big), rtol=1e-5,
                             atol=1e-6)
  assert "active" in aux


# ------------------------------------------------------------------------------------------------
# AuxK.


def test_auxk_codes_are_the_top_dead_latents():
  pre = jnp.array([[5.0, 1.0, 3.0, -2.0, 4.0, 2.0],
                   [0.5, -1.0, -3.0, -2.0, 0.7, -0.1]])
  dead = jnp.array([False, True, True, True, False, True])
  codes = np.asarray(activations.auxk_codes(pre, dead, 2))
  # Row 0: dead latents 1, 2, 3, 5 hold 1, 3, -2, 2 -> keep 3 and 2; live 5 and 4 never.
  np.testing.assert_array_equal(codes, [[0, 0, 3.0, 0, 0, 2.0], [0, 0, 0, 0, 0, 0]])
  g = jax.grad(lambda p: jnp.sum(activations.auxk_codes(p, dead, 2) * 3.0))(pre)
  np.testing.assert_array_equal(np.asarray(g), 3.0 * (codes != 0))


def test_since_fired_counts_tokens_resets_and_saturates():
  config = sae_lib.SAEConfig(d_in=4, width=6, activation="topk", k_max=2, k_aux=3)
  state = sae_lib.init_state(config)
  assert state.since_fired.shape == (6,) and sae_lib.init_state(
      dataclasses.replace(config, k_aux=0)).since_fired is None
  fired = jnp.array([True, False, False, True, False, False])
  state = sae_lib.update_since_fired(state, fired, jnp.int32(10))
  state = sae_lib.update_since_fired(state, ~fired, jnp.int32(7))
  np.testing.assert_array_equal(state.since_fired, [7, 0, 0, 7, 0, 0])
  state = sae_lib.update_since_fired(state, fired, jnp.int32(5))
  np.testing.assert_array_equal(state.since_fired, [0, 5, 5, 0, 5, 5])
  hp = sae_lib.default_hparams(config, dead_tokens=5)
  np.testing.assert_array_equal(sae_lib.dead_latents(state, hp), [0, 1, 1, 0, 1, 1])
  top = state.replace(since_fired=jnp.full((6,), 2**30 - 3, jnp.int32))
  assert int(sae_lib.update_since_fired(top, fired & False, jnp.int32(100)).since_fired[0]) == 2**30
  # The BatchTopK threshold update keeps the counters.
  bt = sae_lib.SAEConfig(d_in=4, width=6, activation="batchtopk", k_max=2, k_aux=3)
  x = jax.random.normal(jax.random.key(0), (5, 4))
  params = sae_lib.init(jax.random.key(1), bt)
  s0 = sae_lib.init_state(bt).replace(since_fired=jnp.arange(6, dtype=jnp.int32))
  out = sae_lib.forward(params, x, bt, sae_lib.default_hparams(bt), state=s0, train=True)[2]
  np.testing.assert_array_equal(out["state"].since_fired, np.arange(6))
  assert int(out["state"].count) == 1


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(activation="relu", k_aux=4), "with a topk/batchtopk activation"),
    (dict(activation="topk", k_max=2, k_aux=99), "k_aux=99 must be 0"),
])
def test_auxk_config_is_validated(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    sae_lib.SAEConfig(d_in=4, width=8, **kwargs)


def test_config_json_leaves_out_opt_in_fields_when_off():
  plain = sae_lib.SAEConfig(d_in=4, width=8, activation="topk", k_max=2)
  assert sae_lib.config_json(plain) == {k: v for k, v in dataclasses.asdict(plain).items()
                                        if k not in sae_config.OPT_IN_FIELDS}
  on = dataclasses.replace(plain, k_aux=3, matryoshka=(2, 4), p_anneal=True,
                           resample_steps=(5, 9))
  used = sae_lib.config_json(on)
  assert [used[k] for k in sae_config.OPT_IN_FIELDS] == [3, [2, 4], True, [5, 9]]
  assert sae_lib.SAEConfig(**used) == on


# ------------------------------------------------------------------------------------------------
# Matryoshka prefixes.


@pytest.mark.parametrize("kw", [dict(), dict(pre_bias=True, recon_norm=True),
                                dict(decoder_norm="none", init="menon")])
def test_decode_prefix_is_decode_of_the_prefix_codes(kw):
  config = sae_lib.SAEConfig(d_in=4, width=8, matryoshka=(2, 5), **kw)
  params = sae_lib.init(jax.random.key(0), config)
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases
  codes = jax.nn.relu(jax.random.normal(jax.random.key(1), (3, 8)))
  for m in (1, 2, 5, 8):
    want = sae_lib.decode(params, codes * (jnp.arange(8) < m)[None], config)
    np.testing.assert_allclose(sae_lib.decode_prefix(params, codes, config, m), want,
                               rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(sae_lib.decode_prefix(params, codes, config, 8),
                                sae_lib.decode(params, codes, config))


@pytest.mark.parametrize("m", [(4, 2), (0, 3), (2, 8), (2.0, 4)])
def test_matryoshka_widths_are_validated(m):
  with pytest.raises(ValueError, match="strictly increasing prefix widths"):
    sae_lib.SAEConfig(d_in=4, width=8, matryoshka=m)
  assert sae_lib.SAEConfig(d_in=4, width=8, matryoshka=[2, 4]).matryoshka == (2, 4)  # JSON


# ------------------------------------------------------------------------------------------------
# Gated.


def _gated(**kw):
  config = sae_lib.SAEConfig(d_in=4, width=8, activation="gated", **kw)
  params = jax.tree.map(lambda p: p + 0.05, sae_lib.init(jax.random.key(0), config))
  x = 2.0 * jax.random.normal(jax.random.key(1), (6, 4))
  return config, params, x, sae_lib.default_hparams(config)


def test_gated_with_shared_magnitudes_is_relu():
  config, params, x, hp = _gated(pre_bias=True)
  tied = {**params, "r_mag": jnp.zeros((8,)), "b_mag": params["b_enc"]}
  relu = dataclasses.replace(config, activation="relu")
  plain = {k: v for k, v in tied.items() if k not in ("r_mag", "b_mag")}
  np.testing.assert_allclose(sae_lib.encode(tied, x, config, hp),
                             sae_lib.encode(plain, x, relu, hp), rtol=1e-6, atol=1e-7)
  gate = sae_lib.forward(params, x, config, hp)[2]["gate_acts"]
  np.testing.assert_allclose(gate, jax.nn.relu(sae_lib.forward(plain, x, relu, hp)[2]["pre_acts"]),
                             rtol=1e-6, atol=1e-7)


def test_gated_gradients_take_the_magnitude_path_only():
  config, params, x, hp = _gated()
  codes = sae_lib.encode(params, x, config, hp)
  g = jax.grad(lambda p: jnp.sum(sae_lib.encode(p, x, config, hp)))(params)
  assert float(jnp.abs(g["b_enc"]).max()) == 0.0  # b_gate: only the (flat) gate reads it
  np.testing.assert_allclose(g["b_mag"], np.sum(np.asarray(codes) > 0, axis=0), rtol=1e-6)
  # d/d r_mag_j = Σ_tokens 1[c_j > 0] · (x @ w_enc)_j · exp(r_mag_j).
  want = np.sum((np.asarray(codes) > 0) * np.asarray(x @ params["w_enc"])
                * np.exp(np.asarray(params["r_mag"])), axis=0)
  np.testing.assert_allclose(g["r_mag"], want, rtol=1e-5, atol=1e-6)


def test_gated_aux_reconstruction_freezes_the_decoder():
  config, params, x, hp = _gated(pre_bias=True, decoder_norm="none")
  gate = sae_lib.forward(params, x, config, hp)[2]["gate_acts"]
  np.testing.assert_allclose(sae_lib.gated_aux_reconstruction(params, gate, config),
                             sae_lib.decode(params, gate, config), rtol=1e-6)
  def aux_loss(p):
    g = sae_lib.forward(p, x, config, hp)[2]["gate_acts"]
    return jnp.sum(jnp.square(sae_lib.gated_aux_reconstruction(p, g, config) - x))
  g = jax.grad(aux_loss)(params)
  for name in ("w_dec", "b_dec", "r_mag", "b_mag"):
    assert float(jnp.abs(g[name]).max()) == 0.0, name
  assert float(jnp.abs(g["w_enc"]).max()) > 0 and float(jnp.abs(g["b_enc"]).max()) > 0
  # The sparsity reads relu(pre_gate) times the dictionary norms.
  norms = np.linalg.norm(np.asarray(params["w_dec"]), axis=-1)
  np.testing.assert_allclose(sae_lib.gated_sparsity_codes(params, gate, config),
                             np.asarray(gate) * norms[None], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Dead-latent resampling.


def test_resample_draws_in_proportion_to_the_weights_without_replacement():
  w = jnp.array([0.0, 1.0, 3.0, 0.0, 6.0])
  idx, ok = jax.vmap(lambda k: resample_lib.draw_inputs(k, w, 4))(
      jax.random.split(jax.random.key(0), 4000))
  idx, ok = np.asarray(idx), np.asarray(ok)
  assert np.all(ok[:, :3]) and not np.any(ok[:, 3])  # three positive weights
  assert all(len(set(row[:3])) == 3 and set(row[:3]) == {1, 2, 4} for row in idx)
  first = np.bincount(idx[:, 0], minlength=5) / len(idx)
  se = np.sqrt(np.array([0.1, 0.3, 0.6]) * np.array([0.9, 0.7, 0.4]) / len(idx))
  assert np.all(np.abs(first[[1, 2, 4]] - [0.1, 0.3, 0.6]) < 4 * se), first


@pytest.mark.parametrize("activation", ["relu", "gated"])
def test_resampled_latents_follow_the_recipe_and_others_are_untouched(activation):
  config = sae_lib.SAEConfig(d_in=4, width=6, activation=activation, resample_steps=(3,),
                             pre_bias=activation == "gated")
  params = jax.tree.map(lambda p: p + 0.3, sae_lib.init(jax.random.key(0), config))
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  opt_state = jax.tree.map(lambda a: a + 1.0 if a.dtype == jnp.float32 else a, opt_state)
  state = sae_lib.init_state(config).replace(since_fired=jnp.array([0, 9, 2, 9, 9, 0], jnp.int32))
  hp = sae_lib.default_hparams(config, dead_tokens=5)  # dead: latents 1, 3, 4
  x = jax.random.normal(jax.random.key(1), (3, 4))
  sq = jnp.array([1.0, 0.0, 2.0])  # two drawable inputs: latents 1 and 3 are resampled, not 4
  new, new_opt, new_state, n = resample_lib.resample(jax.random.key(2), params, opt_state,
                                                     state, hp, x, sq, jnp.bool_(True), config)
  assert int(n) == 2
  chosen = np.array([0, 1, 0, 1, 0, 0], bool)
  np.testing.assert_array_equal(new_state.since_fired, [0, 0, 2, 0, 9, 0])
  alive_norm = np.linalg.norm(np.asarray(params["w_enc"])[:, [0, 2, 5]], axis=0).mean()
  directions = np.asarray(x)[[0, 2]] / np.linalg.norm(np.asarray(x)[[0, 2]], axis=1,
                                                       keepdims=True)
  used = []
  for j in (1, 3):
    row = np.asarray(new["w_dec"])[j]
    match = np.flatnonzero(np.all(np.isclose(directions, row, atol=1e-6), axis=1))
    assert len(match) == 1
    used.append(int(match[0]))
    np.testing.assert_allclose(np.asarray(new["w_enc"])[:, j], row * 0.2 * alive_norm,
                               rtol=1e-5)
  assert sorted(used) == [0, 1]  # each input at most once
  for name in ("b_enc", "r_mag", "b_mag"):
    if name in params:
      np.testing.assert_array_equal(np.asarray(new[name])[chosen], 0.0)
  for name, p in params.items():
    axis = resample_lib.LATENT_AXIS.get(name)
    if axis is None:
      np.testing.assert_array_equal(new[name], p)
      continue
    keep = np.take(np.asarray(new[name]), np.flatnonzero(~chosen), axis=axis)
    np.testing.assert_array_equal(keep, np.take(np.asarray(p), np.flatnonzero(~chosen), axis))
    for moments in (new_opt[0].mu, new_opt[0].nu):
      m = np.asarray(moments[name])
      np.testing.assert_array_equal(np.take(m, np.flatnonzero(chosen), axis=axis), 0.0)
      np.testing.assert_array_equal(np.take(m, np.flatnonzero(~chosen), axis=axis), 1.0)
  assert int(new_opt[0].count) == int(opt_state[0].count)
  # A frozen variant (allowed False) is left as it is.
  same = resample_lib.resample(jax.random.key(2), params, opt_state, state, hp, x, sq,
                               jnp.bool_(False), config)
  for a, b in zip(jax.tree.leaves(same[:3]), jax.tree.leaves((params, opt_state, state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(resample_steps=(5, 5)), "strictly increasing step counts >= 1"),
    (dict(resample_steps=(0,)), "strictly increasing step counts >= 1"),
    (dict(resample_steps=(3,), activation="sparsemax_no_kds", enc_bias=False),
     "needs an encoder with w_enc"),
])
def test_resample_config_is_validated(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    sae_lib.SAEConfig(d_in=4, width=8, **kwargs)
  assert sae_lib.SAEConfig(d_in=4, width=8, resample_steps=[2, 7]).resample_steps == (2, 7)

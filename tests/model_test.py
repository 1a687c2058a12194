"""Tests for jaxsae.lm.model: spec shape and init, causality, sites, splicing, gradients, vmap."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.lm import model as model_lib

TINY = model_lib.ModelConfig(vocab_size=11, n_layers=2, n_heads=2, d_model=32, d_mlp=64,
                             context=16)
B, T = 2, 8


@pytest.fixture(scope="module")
def tiny():
  params = model_lib.init(jax.random.key(0), TINY)
  # Non-trivial LayerNorm scales, so a wrong scale placement cannot hide behind ones.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * (1.0 + 0.3 * jax.random.normal(jax.random.key(len(str(path))), p.shape))
      if "scale" in str(path) else p, params)
  tokens_BT = jax.random.randint(jax.random.key(1), (B, T), 0, TINY.vocab_size)
  return params, tokens_BT


def _logits(params, tokens_BT, **kwargs):
  return model_lib.apply(params, tokens_BT, TINY, **kwargs).logits


# ------------------------------------------------------------------------------------------------
# Spec: sizes, init, reference forward.


@pytest.mark.parametrize("vocab,expected", [(13, 395_520), (28, 397_440), (69, 402_688)])
def test_param_count_matches_spec(vocab, expected):
  config = model_lib.ModelConfig(vocab_size=vocab)
  params = model_lib.init(jax.random.key(0), config)
  assert model_lib.count_params(params) == expected
  assert model_lib.count_params(params, include_positions=True) == expected + 256 * 128
  shapes = jax.eval_shape(lambda key: model_lib.init(key, config), jax.random.key(0))
  assert model_lib.count_params(shapes) == expected


def test_init_statistics():
  config = model_lib.ModelConfig(vocab_size=69)
  params = model_lib.init(jax.random.key(3), config)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}
  assert all(v.dtype == np.float32 for v in flat.values())
  n_checked = 0
  for name, w in flat.items():
    if "scale" in name:
      np.testing.assert_array_equal(w, 1.0)
      continue
    expected = 0.02 / 2 if "c_proj" in name else 0.02  # 0.02 / sqrt(2 * n_layers)
    n = w.size
    # Std of a sample std of n normals is sigma / sqrt(2n); allow 6 of them.
    assert abs(w.std() - expected) < 6 * expected / math.sqrt(2 * n), (name, w.std())
    assert abs(w.mean()) < 6 * expected / math.sqrt(n), (name, w.mean())
    n_checked += 1
  assert n_checked == 2 + 2 * 4  # wte, wpe, and four matrices per block


def _reference_forward(params, tokens_BT, config):
  """Independent float64 numpy nanoGPT forward (no biases, erf GELU, tied unembedding)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  erf = np.vectorize(math.erf)

  def ln(x, scale):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + config.ln_eps) * scale

  t = tokens_BT.shape[1]
  nh, hd = config.n_heads, config.head_dim
  x = p["wte"][np.asarray(tokens_BT)] + p["wpe"][:t][None]
  for l in range(config.n_layers):
    blk = p[f"block_{l}"]
    h = ln(x, blk["ln_1"]["scale"]) @ blk["attn"]["c_attn"]["kernel"]
    q, k, v = (z.reshape(z.shape[0], t, nh, hd).transpose(0, 2, 1, 3)
               for z in np.split(h, 3, axis=-1))
    att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = x + y @ blk["attn"]["c_proj"]["kernel"]
    h = ln(x, blk["ln_2"]["scale"]) @ blk["mlp"]["c_fc"]["kernel"]
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    x = x + h @ blk["mlp"]["c_proj"]["kernel"]
  return ln(x, p["ln_f"]["scale"]) @ p["wte"].T


def test_matches_reference_forward(tiny):
  params, tokens_BT = tiny
  # Larger weights than the init so attention patterns and GELU curvature actually matter.
  params = jax.tree_util.tree_map(lambda p: p if p.ndim == 1 else p * 20.0, params)
  logits_BTV = jax.jit(_logits)(params, tokens_BT)
  assert logits_BTV.shape == (B, T, TINY.vocab_size) and logits_BTV.dtype == jnp.float32
  np.testing.assert_allclose(logits_BTV, _reference_forward(params, tokens_BT, TINY),
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
  params, tokens_BT = tiny
  config = dataclasses.replace(TINY, dtype=jnp.bfloat16)
  result = jax.jit(lambda p, t: model_lib.apply(p, t, config, collect=("resid_post.0",)))(
      params, tokens_BT)
  assert result.logits.dtype == jnp.float32
  assert result.acts["resid_post.0"].dtype == jnp.bfloat16
  np.testing.assert_allclose(result.logits, _logits(params, tokens_BT), atol=5e-2)


@pytest.mark.parametrize("kwargs", [dict(d_model=30, n_heads=4), dict(n_layers=0),
                                    dict(vocab_size=-1), dict(ln_eps=0.0), dict(dtype=jnp.int32)])
def test_config_validation(kwargs):
  with pytest.raises(ValueError):
    model_lib.ModelConfig(**{"vocab_size": 5, **kwargs})


def test_too_long_sequence_raises(tiny):
  params, _ = tiny
  with pytest.raises(ValueError, match="context"):
    model_lib.apply(params, jnp.zeros((1, TINY.context + 1), jnp.int32), TINY)


# ------------------------------------------------------------------------------------------------
# Causality and sites.


def test_causal(tiny):
  params, tokens_BT = tiny
  t = 4
  changed_BT = tokens_BT.at[:, t + 1:].set((tokens_BT[:, t + 1:] + 1) % TINY.vocab_size)
  f = jax.jit(_logits)
  a_BTV, b_BTV = f(params, tokens_BT), f(params, changed_BT)
  np.testing.assert_allclose(a_BTV[:, :t + 1], b_BTV[:, :t + 1], rtol=0, atol=1e-6)
  assert np.abs(a_BTV[:, t + 1:] - b_BTV[:, t + 1:]).min() > 0  # later positions do see them
  # The diagonal is attended: changing token t changes position t.
  changed_t_BT = tokens_BT.at[:, t].set((tokens_BT[:, t] + 1) % TINY.vocab_size)
  assert np.abs(f(params, changed_t_BT)[:, t] - a_BTV[:, t]).min() > 0


def test_site_names():
  assert model_lib.site_names(TINY) == (
      "resid_pre.0", "attn_out.0", "mlp_in.0", "mlp_out.0", "resid_post.0",
      "resid_pre.1", "attn_out.1", "mlp_in.1", "mlp_out.1", "resid_post.1", "ln_final")


def test_mlp_sites_are_the_mlp_input_and_output(tiny):
  """mlp_in.l = ln_2(resid_pre.l + attn_out.l) and mlp_out.l = MLP l of it; collecting them
  leaves the logits bit-identical."""
  params, tokens_BT = tiny
  sites = ("mlp_in.0", "mlp_out.0", "mlp_in.1", "mlp_out.1", "resid_pre.1", "attn_out.1")
  res = model_lib.apply(params, tokens_BT, TINY, collect=sites)
  np.testing.assert_array_equal(res.logits, _logits(params, tokens_BT))
  bp = params["block_1"]
  x_BTD = np.asarray(res.acts["resid_pre.1"] + res.acts["attn_out.1"], np.float64)
  h_BTD = (x_BTD - x_BTD.mean(-1, keepdims=True)) / np.sqrt(x_BTD.var(-1, keepdims=True) + 1e-5)
  h_BTD = h_BTD * np.asarray(bp["ln_2"]["scale"])
  np.testing.assert_allclose(res.acts["mlp_in.1"], h_BTD, rtol=1e-5, atol=1e-5)
  u_BTM = np.asarray(res.acts["mlp_in.1"], np.float64) @ np.asarray(bp["mlp"]["c_fc"]["kernel"])
  gelu_BTM = 0.5 * u_BTM * (1 + np.vectorize(math.erf)(u_BTM / math.sqrt(2)))
  np.testing.assert_allclose(res.acts["mlp_out.1"],
                             gelu_BTM @ np.asarray(bp["mlp"]["c_proj"]["kernel"]),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_mlp_out_replacement_splices_an_mlp_replacement(tiny, layer):
  """Replacing mlp_out.l by its own clean value is exact; by zeros, it is the model whose MLP l
  has a zero output projection."""
  params, tokens_BT = tiny
  site = f"mlp_out.{layer}"
  clean = model_lib.apply(params, tokens_BT, TINY, collect=(site,))
  own = model_lib.apply(params, tokens_BT, TINY, replace={site: lambda m: clean.acts[site]})
  np.testing.assert_array_equal(own.logits, clean.logits)
  zeroed = model_lib.apply(params, tokens_BT, TINY, replace={site: jnp.zeros_like}).logits
  no_mlp = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if f"block_{layer}" in str(path) and "mlp" in str(path)
      and "c_proj" in str(path) else p, params)
  np.testing.assert_allclose(zeroed, _logits(no_mlp, tokens_BT), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(zeroed - clean.logits)).max() > 1e-4  # MLP l matters here


def test_sites_are_what_they_say(tiny):
  params, tokens_BT = tiny
  acts = model_lib.apply(params, tokens_BT, TINY, collect=model_lib.site_names(TINY)).acts
  for l in range(TINY.n_layers):
    np.testing.assert_allclose(
        acts[f"resid_pre.{l}"] + acts[f"attn_out.{l}"] + acts[f"mlp_out.{l}"],
        acts[f"resid_post.{l}"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(acts["resid_post.0"], acts["resid_pre.1"])
  x_BTD = np.asarray(acts["resid_post.1"], np.float64)
  x_BTD = (x_BTD - x_BTD.mean(-1, keepdims=True)) / np.sqrt(x_BTD.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(acts["ln_final"], x_BTD * np.asarray(params["ln_f"]["scale"]),
                             rtol=1e-5, atol=1e-5)


def test_identity_replacement_is_bitwise_clean(tiny):
  params, tokens_BT = tiny
  identity = {s: (lambda x: x) for s in model_lib.site_names(TINY)}
  clean = jax.jit(_logits)(params, tokens_BT)
  spliced = jax.jit(lambda p, t: _logits(p, t, replace=identity))(params, tokens_BT)
  np.testing.assert_array_equal(spliced, clean)
  np.testing.assert_array_equal(_logits(params, tokens_BT, replace=identity),
                                _logits(params, tokens_BT))


@pytest.mark.parametrize("site", model_lib.site_names(TINY))
def test_replacement_at_each_site_takes_effect(tiny, site):
  params, tokens_BT = tiny
  clean = model_lib.apply(params, tokens_BT, TINY, collect=model_lib.site_names(TINY))
  result = model_lib.apply(params, tokens_BT, TINY, replace={site: lambda x: 0.5 * x},
                           collect=model_lib.site_names(TINY))
  np.testing.assert_allclose(result.acts[site], 0.5 * clean.acts[site], rtol=1e-6)
  assert not np.allclose(result.logits, clean.logits)
  order = model_lib.site_names(TINY)
  for earlier in order[:order.index(site)]:  # nothing upstream moves
    np.testing.assert_array_equal(result.acts[earlier], clean.acts[earlier])


def test_two_replacements_compose_in_forward_order(tiny):
  params, tokens_BT = tiny
  v_11D = jax.random.normal(jax.random.key(5), (1, 1, TINY.d_model))
  add = lambda x: x + v_11D  # noqa: E731
  scale = lambda x: 3.0 * x  # noqa: E731
  clean = model_lib.apply(params, tokens_BT, TINY, collect=("resid_post.0",))
  composed_BTD = 3.0 * (clean.acts["resid_post.0"] + v_11D)  # post first, then pre
  expected = model_lib.apply_from(params, "resid_pre.1", composed_BTD, TINY).logits
  sites = ("resid_post.0", "resid_pre.1")
  # Argument order does not matter: post is applied before pre.
  for replace in ({"resid_post.0": add, "resid_pre.1": scale},
                  {"resid_pre.1": scale, "resid_post.0": add},
                  [("resid_pre.1", scale), ("resid_post.0", add)]):
    result = model_lib.apply(params, tokens_BT, TINY, replace=replace, collect=sites)
    np.testing.assert_allclose(result.logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.acts["resid_post.0"], clean.acts["resid_post.0"] + v_11D,
                               rtol=1e-6)
    np.testing.assert_allclose(result.acts["resid_pre.1"], composed_BTD, rtol=1e-6)
  # Repeated pairs for one site compose in the order given.
  result = model_lib.apply(params, tokens_BT, TINY, collect=("resid_post.0",),
                           replace=[("resid_post.0", add), ("resid_post.0", scale)])
  np.testing.assert_allclose(result.acts["resid_post.0"], composed_BTD, rtol=1e-6)


def test_stop_at_equals_collect(tiny):
  params, tokens_BT = tiny
  sites = model_lib.site_names(TINY)
  full = jax.jit(lambda p, t: model_lib.apply(p, t, TINY, collect=sites))(params, tokens_BT)
  for site in sites:
    stopped = jax.jit(lambda p, t, s=site: model_lib.apply(p, t, TINY, stop_at=s))(params,
                                                                                   tokens_BT)
    assert stopped.logits is None and set(stopped.acts) == {site}
    np.testing.assert_allclose(stopped.acts[site], full.acts[site], rtol=1e-6, atol=1e-6)


def test_stop_at_skips_the_rest(tiny):
  params, tokens_BT = tiny

  def n_matmuls(**kwargs):
    jaxpr = jax.make_jaxpr(lambda p: model_lib.apply(p, tokens_BT, TINY, **kwargs))(params)
    return str(jaxpr).count("dot_general")

  per_block = n_matmuls(stop_at="resid_post.0")
  assert per_block > 0
  assert n_matmuls() == 2 * per_block + 1  # two blocks and the unembedding
  assert n_matmuls(stop_at="resid_pre.0") == 0


@pytest.mark.parametrize("site", ["resid_pre.0", "resid_post.0", "resid_pre.1", "resid_post.1",
                                  "ln_final"])
def test_apply_from_clean_activation_gives_clean_logits(tiny, site):
  params, tokens_BT = tiny
  later = model_lib.site_names(TINY)[model_lib.site_names(TINY).index(site):]
  clean = model_lib.apply(params, tokens_BT, TINY, collect=later)
  resumed = model_lib.apply_from(params, site, clean.acts[site], TINY, collect=later)
  np.testing.assert_allclose(resumed.logits, clean.logits, rtol=1e-6, atol=1e-6)
  for s in later:
    np.testing.assert_allclose(resumed.acts[s], clean.acts[s], rtol=1e-6, atol=1e-6)
  # A replacement at the start site itself is not applied again.
  same = model_lib.apply_from(params, site, clean.acts[site], TINY, replace={site: jnp.zeros_like})
  np.testing.assert_array_equal(same.logits, resumed.logits)


def test_apply_from_resid_post_applies_next_resid_pre(tiny):
  params, tokens_BT = tiny
  x_BTD = model_lib.apply(params, tokens_BT, TINY, stop_at="resid_post.0").acts["resid_post.0"]
  plain = model_lib.apply_from(params, "resid_post.0", x_BTD, TINY).logits
  spliced = model_lib.apply_from(params, "resid_post.0", x_BTD, TINY,
                                 replace={"resid_pre.1": lambda x: 2.0 * x}).logits
  np.testing.assert_allclose(
      spliced, model_lib.apply_from(params, "resid_pre.1", 2.0 * x_BTD, TINY).logits, rtol=1e-6)
  assert not np.allclose(spliced, plain)


def test_bad_sites_raise(tiny):
  params, tokens_BT = tiny
  x_BTD = jnp.zeros((B, T, TINY.d_model))
  for kwargs in (dict(replace={"resid_post.7": jnp.zeros_like}), dict(collect=("resid",)),
                 dict(stop_at="mlp_hidden.0")):
    with pytest.raises(ValueError, match="valid sites are: resid_pre.0, attn_out.0"):
      model_lib.apply(params, tokens_BT, TINY, **kwargs)
  with pytest.raises(ValueError, match="valid sites"):
    model_lib.apply_from(params, "resid_post.2", x_BTD, TINY)
  for site in ("attn_out.0", "mlp_out.1"):
    with pytest.raises(ValueError, match="cannot resume"):
      model_lib.apply_from(params, site, x_BTD, TINY)
  with pytest.raises(ValueError, match="earlier sites"):
    model_lib.apply_from(params, "resid_pre.1", x_BTD, TINY, collect=("resid_post.0",))
  with pytest.raises(ValueError, match="before"):
    model_lib.apply(params, tokens_BT, TINY, stop_at="resid_post.0", collect=("ln_final",))
  with pytest.raises(ValueError, match="shape"):
    model_lib.apply(params, tokens_BT, TINY, replace={"ln_final": lambda x: x[..., :3]})
  with pytest.raises(ValueError, match="params pytree"):
    model_lib.apply({"params": params}, tokens_BT, TINY)


# ------------------------------------------------------------------------------------------------
# Gradients and vmap.


def _sae(sae_params, x_BTD, act=jax.nn.relu):
  w_enc_DF, w_dec_FD = sae_params
  return act(x_BTD @ w_enc_DF) @ w_dec_FD


def _sae_params(key, n_latents=48, scale=0.3):
  k1, k2 = jax.random.split(key)
  return (scale * jax.random.normal(k1, (TINY.d_model, n_latents)),
          scale * jax.random.normal(k2, (n_latents, TINY.d_model)))


def _spliced_loss(sae_params, params, tokens_BT, trainable=False):
  # tanh rather than ReLU: smooth, so a finite difference is a fair check of the gradient.
  logits_BTV = model_lib.apply(
      params, tokens_BT, TINY, trainable=trainable,
      replace={"resid_post.0": lambda x: _sae(sae_params, x, act=jnp.tanh)}).logits
  return jnp.mean(jax.nn.log_softmax(logits_BTV)[..., 0])


def test_grad_through_replacement_matches_finite_difference(tiny):
  params, tokens_BT = tiny
  sae_params = _sae_params(jax.random.key(7))
  loss, grads = jax.jit(jax.value_and_grad(_spliced_loss))(sae_params, params, tokens_BT)
  assert all(np.abs(g).max() > 0 for g in grads)
  direction = _sae_params(jax.random.key(8), scale=1.0)
  eps = 3e-3
  shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, sae_params, direction)  # noqa
  f = jax.jit(_spliced_loss)
  fd = (f(shift(eps), params, tokens_BT) - f(shift(-eps), params, tokens_BT)) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(grads, direction))
  np.testing.assert_allclose(fd, analytic, rtol=1e-2)
  assert abs(analytic) > 1e-3


def test_model_params_frozen_unless_trainable(tiny):
  params, tokens_BT = tiny
  sae_params = _sae_params(jax.random.key(7))
  grad_fn = jax.jit(jax.grad(_spliced_loss, argnums=1), static_argnums=3)
  frozen = grad_fn(sae_params, params, tokens_BT, False)
  for g in jax.tree_util.tree_leaves(frozen):
    np.testing.assert_array_equal(g, 0.0)
  trained = grad_fn(sae_params, params, tokens_BT, True)
  for path, g in jax.tree_util.tree_leaves_with_path(trained):
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
  # apply_from freezes too.
  x_BTD = jnp.ones((B, T, TINY.d_model))
  g_from = jax.jit(jax.grad(
      lambda p: model_lib.apply_from(p, "resid_pre.1", x_BTD, TINY).logits.sum()))(params)
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(g_from))


def test_vmapped_replacement_equals_separate_runs(tiny):
  params, tokens_BT = tiny
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                   *[_sae_params(jax.random.key(10 + i)) for i in range(3)])

  def run(sae_params, params, tokens_BT):
    return model_lib.apply(params, tokens_BT, TINY, collect=("resid_pre.1", "ln_final"),
                           replace={"resid_post.0": lambda x: _sae(sae_params, x)})

  def run_from(sae_params, params, x_BTD):
    return model_lib.apply_from(params, "resid_post.0", x_BTD, TINY,
                                replace={"resid_post.1": lambda x: _sae(sae_params, x)}).logits

  batched = jax.jit(jax.vmap(run, in_axes=(0, None, None)))(stacked, params, tokens_BT)
  x_BTD = model_lib.apply(params, tokens_BT, TINY, stop_at="resid_post.0").acts["resid_post.0"]
  batched_from = jax.jit(jax.vmap(run_from, in_axes=(0, None, None)))(stacked, params, x_BTD)
  assert batched.logits.shape == (3, B, T, TINY.vocab_size)
  for i in range(3):
    one = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
    single = jax.jit(run)(one, params, tokens_BT)
    np.testing.assert_allclose(batched.logits[i], single.logits, rtol=1e-5, atol=1e-5)
    for s in single.acts:
      np.testing.assert_allclose(batched.acts[s][i], single.acts[s], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched_from[i], jax.jit(run_from)(one, params, x_BTD),
                               rtol=1e-5, atol=1e-5)
  assert not np.allclose(batched.logits[0], batched.logits[1])

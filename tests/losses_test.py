"""Tests for jaxsae.grid.losses: every term against an independent NumPy reference (reductions, KL
direction, masks), identities (x̂ = x, identity SAE spliced into the model), presets and totals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.grid import losses
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import model as model_lib

B, T, D, F, V = 3, 5, 6, 10, 7

# Tests compile many tiny programs once each: XLA's backend optimisations cost more than they save.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


def _randn(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _mask(seed=0):
  m = np.random.default_rng(seed).random((B, T)) < 0.6
  m[0, 0], m[1, 1] = True, False  # at least one token in and one out
  return m


def _np_kl(p_logits, q_logits):
  """KL(p ‖ q) per token in float64."""
  def log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp, lq = log_softmax(p_logits), log_softmax(q_logits)
  return (np.exp(lp) * (lp - lq)).sum(-1)


# ------------------------------------------------------------------------------------------------
# Terms against NumPy.


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_sparsity_reductions(p):
  codes = np.maximum(_randn(0, (B, T, F)), 0) - 0.1 * (_randn(1, (B, T, F)) > 1.5)  # some < 0
  m = _mask()
  norms = (np.abs(codes.astype(np.float64)) ** p).sum(-1) ** (1 / p)
  e2e = 0.7 * norms[m].mean() / D
  np.testing.assert_allclose(losses.sparsity(codes, m, D, 0.7, p), e2e, rtol=1e-5)
  np.testing.assert_allclose(losses.sparsity(codes, None, D, 0.7, p), 0.7 * norms.mean() / D,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.sparsity(codes, m, D, 0.7, p, "sum_batch"),
                             0.7 * norms[m].sum(), rtol=1e-5)
  if p == 1.0:  # Menon: Σ_{tokens, latents} |c|, i.e. T·F·mean-per-element times bigger
    np.testing.assert_allclose(losses.sparsity(codes, None, D, 1.0, 1.0, "sum_batch"),
                               np.abs(codes).sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="reduction"):
    losses.sparsity(codes, m, D, 1.0, p, "mean")


def test_sparsity_gradient_finite_at_zero():
  codes = jnp.zeros((B, T, F)).at[0, 0, 1].set(2.0)
  for p in (0.5, 2.0):
    g = _jit(jax.grad(lambda c: losses.sparsity(c, None, D, 1.0, p)))(codes)
    assert np.all(np.isfinite(g)), p
    assert g[0, 0, 1] > 0


def test_out_to_in_is_a_masked_element_mean():
  x_hat, x, m = _randn(0, (B, T, D)), _randn(1, (B, T, D)), _mask()
  sq = (x_hat.astype(np.float64) - x) ** 2
  np.testing.assert_allclose(losses.out_to_in(x_hat, x, m), sq[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.out_to_in(x_hat, x, None), sq.mean(), rtol=1e-5)
  # Element mean, not token mean of the per-token sum.
  assert not np.isclose(float(losses.out_to_in(x_hat, x, m)), sq[m].sum(-1).mean(), rtol=1e-2)
  np.testing.assert_array_equal(losses.out_to_in(x, x, m), 0.0)


def test_in_to_orig_splits_across_sites():
  sites = ("resid_post.1", "resid_post.2")
  spliced = {h: _randn(i, (B, T, D)) for i, h in enumerate(sites)}
  clean = {h: 2 * _randn(10 + i, (B, T, D)) for i, h in enumerate(sites)}
  m = _mask(1)
  total, per_site = losses.in_to_orig(spliced, clean, m)
  ref = {h: ((spliced[h].astype(np.float64) - clean[h]) ** 2)[m].mean() for h in sites}
  for h in sites:
    np.testing.assert_allclose(per_site[h], ref[h], rtol=1e-5)
  np.testing.assert_allclose(total, (ref[sites[0]] + ref[sites[1]]) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match="spliced sites"):
    losses.in_to_orig(spliced, {sites[0]: clean[sites[0]]}, m)
  with pytest.raises(ValueError, match="at least one downstream site"):
    losses.in_to_orig({}, {}, m)


def test_logits_kl_direction_mask_and_stop_gradient():
  clean, spliced = 2 * _randn(0, (B, T, V)), 2 * _randn(1, (B, T, V))
  m = _mask(2)
  forward_kl = _np_kl(clean, spliced)[m].mean()
  reverse_kl = _np_kl(spliced, clean)[m].mean()
  assert abs(forward_kl - reverse_kl) > 0.05  # the test can tell the directions apart
  np.testing.assert_allclose(losses.logits_kl(clean, spliced, m), forward_kl, rtol=1e-5)
  np.testing.assert_allclose(losses.logits_kl(clean, spliced, None),
                             _np_kl(clean, spliced).mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.logits_kl(clean, clean + 3.0, m), 0.0, atol=1e-6)
  g_clean, g_spliced = jax.grad(losses.logits_kl, (0, 1))(jnp.asarray(clean),
                                                           jnp.asarray(spliced), m)
  np.testing.assert_array_equal(g_clean, 0.0)
  # d KL / d spliced_logits = (softmax(spliced) − softmax(clean)) / n_tokens at masked tokens.
  sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(
      -1, keepdims=True)
  np.testing.assert_allclose(g_spliced, (sm(spliced) - sm(clean)) * m[..., None] / m.sum(),
                             atol=1e-6)
  # The clean side given once as log-probabilities (the trainer's per-batch form): the same KL
  # (to the independent numpy value) and the same gradient, none reaching the log-probabilities.
  logp = losses.clean_log_probs(jnp.asarray(clean))
  np.testing.assert_allclose(losses.logits_kl_from_log_probs(logp, spliced, m), forward_kl,
                             rtol=1e-5)
  g_logp, g_sp = jax.grad(losses.logits_kl_from_log_probs, (0, 1))(logp, jnp.asarray(spliced), m)
  np.testing.assert_array_equal(g_logp, 0.0)
  np.testing.assert_allclose(g_sp, g_spliced, atol=1e-7)


def test_masked_out_tokens_do_not_matter():
  m = _mask(3)
  codes, x_hat, x = np.abs(_randn(0, (B, T, F))), _randn(1, (B, T, D)), _randn(2, (B, T, D))
  cl, sp = _randn(3, (B, T, V)), _randn(4, (B, T, V))
  def junk(a, seed):
    return np.where(m[..., None], a, 100 * _randn(seed, a.shape))
  pairs = [(losses.sparsity(codes, m, D), losses.sparsity(junk(codes, 5), m, D)),
           (losses.out_to_in(x_hat, x, m), losses.out_to_in(junk(x_hat, 6), junk(x, 7), m)),
           (losses.logits_kl(cl, sp, m), losses.logits_kl(junk(cl, 8), junk(sp, 9), m))]
  for a, b in pairs:
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_identity_sae_gives_zero_losses():
  """x̂ = x exactly: a ReLU SAE with w_enc = [I, −I], w_dec = [I; −I] and no biases."""
  mconfig = model_lib.ModelConfig(vocab_size=V, n_layers=2, n_heads=2, d_model=D, d_mlp=12,
                                  context=T)
  config = sae_lib.SAEConfig(d_in=D, width=2 * D, enc_bias=False, dec_bias=False,
                             decoder_norm="none")
  eye = jnp.eye(D)
  params = {"w_enc": jnp.concatenate([eye, -eye], axis=1),
            "w_dec": jnp.concatenate([eye, -eye], axis=0)}
  hp = sae_lib.default_hparams(config)
  tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
  site = "resid_pre.1"
  m = _mask(4)

  @_jit
  def run(mparams):
    clean = model_lib.apply(mparams, tokens_BT, mconfig, collect=[site, "resid_post.1"])
    x = clean.acts[site]
    x_hat, codes, aux = sae_lib.forward(params, x, config, hp)
    spliced = model_lib.apply_from(mparams, site, x_hat, mconfig, collect=["resid_post.1"])
    terms = losses.compute_terms(
        losses.LossConfig("e2e_ds"), d_in=D, codes=codes, x_hat=x_hat, target=aux["target"],
        mask=m, clean_logits=clean.logits, spliced_logits=spliced.logits,
        spliced_acts=spliced.acts, clean_acts={"resid_post.1": clean.acts["resid_post.1"]})
    return terms, x

  terms, x = run(model_lib.init(jax.random.key(0, impl="rbg"), mconfig))
  assert float(jnp.abs(x).max()) > 0.01
  np.testing.assert_allclose(terms["out_to_in"], 0.0, atol=1e-10)
  np.testing.assert_allclose(terms["logits_kl"], 0.0, atol=1e-6)
  np.testing.assert_allclose(terms["in_to_orig"], 0.0, atol=1e-10)
  np.testing.assert_allclose(terms["in_to_orig/resid_post.1"], 0.0, atol=1e-10)
  assert terms["sparsity"] > 0


# ------------------------------------------------------------------------------------------------
# Presets, coefficients, totals, sites.


def test_loss_config_presets_and_validation():
  assert losses.LossConfig("local").terms == ("out_to_in", "sparsity")
  assert not losses.LossConfig("local").needs_spliced_forward
  e2e = losses.LossConfig("e2e")
  assert "out_to_in" in e2e.terms and e2e.needs_spliced_forward and not e2e.needs_downstream
  assert losses.LossConfig("e2e_ds").needs_downstream
  for kwargs, match in [(dict(preset="e2e+ds"), "LossConfig.preset"),
                        (dict(sparsity_reduction="mean"), "LossConfig.sparsity_reduction"),
                        (dict(sparsity_p=0.0), "LossConfig.sparsity_p")]:
    with pytest.raises(ValueError, match=match):
      losses.LossConfig(**kwargs)
  c = losses.default_coeffs(losses.LossConfig("e2e_ds"), sparsity=0.3)
  assert (float(c.logits_kl), float(c.in_to_orig), float(c.out_to_in), float(c.sparsity)) == (
      0.5, 2.5, 0.0, pytest.approx(0.3))
  c = losses.default_coeffs(losses.LossConfig("local"), sparsity=0.1)
  assert (float(c.out_to_in), float(c.logits_kl)) == (1.0, 0.0)
  with pytest.raises(ValueError, match="LossCoeffs.in_to_orig must be finite and >= 0"):
    losses.default_coeffs(losses.LossConfig("e2e_ds"), sparsity=0.3, in_to_orig=-1.0)
  with pytest.raises(ValueError, match="Unknown LossCoeffs"):
    losses.default_coeffs(losses.LossConfig("e2e"), sparsity=0.3, kl=1.0)


def test_total_loss_logs_zero_coefficient_terms():
  config = losses.LossConfig("e2e")
  codes, x_hat, x = np.abs(_randn(0, (B, T, F))), _randn(1, (B, T, D)), _randn(2, (B, T, D))
  cl, sp = _randn(3, (B, T, V)), _randn(4, (B, T, V))
  m = _mask(5)
  terms = losses.compute_terms(config, d_in=D, codes=codes, x_hat=x_hat, target=x, mask=m,
                               clean_logits=cl, spliced_logits=sp)
  coeffs = losses.default_coeffs(config, sparsity=0.25)
  total, logs = losses.total_loss(terms, coeffs)
  expected = float(losses.logits_kl(cl, sp, m)) + 0.25 * float(losses.sparsity(codes, m, D))
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert set(logs) == {"logits_kl", "out_to_in", "sparsity", "total"}
  np.testing.assert_allclose(logs["out_to_in"], losses.out_to_in(x_hat, x, m), rtol=1e-6)
  assert logs["out_to_in"] > 0  # logged although its coefficient is 0
  with pytest.raises(ValueError, match="needs clean_logits"):
    losses.compute_terms(config, d_in=D, codes=codes, x_hat=x_hat, target=x, mask=m)
  # Stacked coefficients vmap like any other per-variant value.
  coeffs_N = jax.tree.map(lambda c: jnp.stack([c, 2 * c]), coeffs)
  totals = jax.vmap(losses.total_loss, in_axes=(None, 0))(terms, coeffs_N)[0]
  np.testing.assert_allclose(totals, [expected, 2 * expected], rtol=1e-5)


def test_downstream_sites():
  two = model_lib.ModelConfig(vocab_size=V, n_layers=2)
  assert losses.downstream_sites(two, "resid_post.0") == ("resid_post.1",)
  assert losses.downstream_sites(two, "resid_post.0", include_final=False) == ()
  assert losses.downstream_sites(two, "resid_pre.0") == ("resid_post.0", "resid_post.1")
  assert losses.downstream_sites(two, "resid_pre.1") == ("resid_post.1",)  # not resid_post.0
  assert losses.downstream_sites(two, "mlp_out.0") == ("resid_post.0", "resid_post.1")
  assert losses.downstream_sites(two, "ln_final") == ()
  four = model_lib.ModelConfig(vocab_size=V, n_layers=4)
  # The e2e paper's H for an SAE at resid_pre.1: later resid_pre's, i.e. resid_post.1..2.
  assert losses.downstream_sites(four, "resid_pre.1", include_final=False) == (
      "resid_post.1", "resid_post.2")
  assert losses.LossConfig("e2e_ds").downstream_sites(two, "resid_pre.0") == (
      "resid_post.0", "resid_post.1")
  assert losses.LossConfig("e2e_ds", include_final_resid=False).downstream_sites(
      two, "resid_pre.0") == ("resid_post.0",)
  with pytest.raises(ValueError, match="Unknown SAE site"):
    losses.downstream_sites(two, "resid_post.2")


# ------------------------------------------------------------------------------------------------
# The causal-interpolation term.


def test_nearest_neighbours_match_brute_force_and_respect_rows_and_masks():
  rng = np.random.default_rng(0)
  codes = rng.normal(size=(3, 7, 5)).astype(np.float32)
  mask = rng.random((3, 7)) < 0.7
  mask[2] = False
  mask[2, 4] = True  # a row with one selected token: no candidate, j = i
  j = np.asarray(losses.nearest_neighbours(jnp.asarray(codes), jnp.asarray(mask)))
  for b in range(3):
    for t in range(7):
      cands = [s for s in range(7) if s != t and mask[b, s]]
      if not cands:
        assert j[b, t] == t
        continue
      d = [np.sum((codes[b, t] - codes[b, s]) ** 2) for s in cands]
      assert j[b, t] == cands[int(np.argmin(d))]
      assert j[b, t] != t and mask[b, j[b, t]]
  # Rows are independent: a token identical to one in another row is not picked from there.
  twin = codes.copy()
  twin[1, 0] = twin[0, 0]
  j2 = np.asarray(losses.nearest_neighbours(jnp.asarray(twin), None))
  assert (j2 != np.arange(7)[None]).all()
  assert j2.shape == (3, 7)


def test_interpolate_endpoints_and_per_token_lambda():
  rng = np.random.default_rng(1)
  v = jnp.asarray(rng.normal(size=(2, 4, 3)).astype(np.float32))
  j = jnp.asarray([[1, 0, 3, 2], [2, 2, 0, 0]], jnp.int32)
  np.testing.assert_array_equal(losses.interpolate(v, j, 0.0), v)
  np.testing.assert_allclose(losses.interpolate(v, j, 1.0), losses.gather_rows(v, j), atol=1e-6)
  lam = jnp.asarray(rng.random((2, 4)).astype(np.float32))
  ref = np.stack([np.asarray(v)[b][np.asarray(j)[b]] for b in range(2)])
  want = np.asarray(v) + np.asarray(lam)[..., None] * (ref - np.asarray(v))
  np.testing.assert_allclose(losses.interpolate(v, j, lam), want, rtol=1e-6, atol=1e-6)


def test_causal_distance_references():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(2, 3, 6)).astype(np.float32)
  y = rng.normal(size=(2, 3, 6)).astype(np.float32)
  m = np.array([[1, 1, 0], [0, 1, 1]], bool)
  mse = float(losses.causal_distance(jnp.asarray(a), jnp.asarray(y), jnp.asarray(m), "mse"))
  np.testing.assert_allclose(mse, np.mean(((a - y) ** 2)[m]), rtol=1e-5)
  kl = float(losses.causal_distance(jnp.asarray(a), jnp.asarray(y), jnp.asarray(m), "kl"))
  ls = lambda z: z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  p = np.exp(ls(y))
  np.testing.assert_allclose(kl, np.mean(np.sum(p * (ls(y) - ls(a)), -1)[m]), rtol=1e-5)
  # The target is a constant: no gradient reaches it.
  g = jax.grad(lambda t: losses.causal_distance(jnp.asarray(a), t, None, "kl"))(jnp.asarray(y))
  assert float(jnp.abs(g).max()) == 0.0
  with pytest.raises(ValueError, match="causal distance"):
    losses.causal_distance(jnp.asarray(a), jnp.asarray(y), None, "l1")


def test_causal_ramp_and_lambda_draws():
  ramp = [float(losses.causal_ramp(s, 10, 4)) for s in (0, 9, 10, 11, 13, 20)]
  np.testing.assert_allclose(ramp, [0, 0, 0.25, 0.5, 1.0, 1.0])
  assert [float(losses.causal_ramp(s, 3, 0)) for s in (2, 3, 50)] == [0.0, 1.0, 1.0]
  key = jax.random.key(0)
  assert losses.draw_lambda(key, "step", 0.2, (2, 3)).shape == ()
  lam = np.asarray(losses.draw_lambda(key, "token", 0.2, (20, 30)))
  assert lam.shape == (20, 30) and 0 <= lam.min() and lam.max() < 1 and lam.std() > 0.2
  assert float(losses.draw_lambda(key, "fixed", 0.02, (2, 3))) == pytest.approx(0.02)
  assert losses.LossConfig(causal=True).terms[-1] == "causal"
  with pytest.raises(ValueError, match="causal_target"):
    losses.LossConfig(causal=True, causal_target="other")


def test_auxk_term_fits_the_residual_with_the_dead_latents_only():
  rng = np.random.default_rng(0)
  x_hat, target = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(2))
  dict_FD = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  mask = jnp.array([True, False, True])
  codes = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  value = losses.auxk(codes, dict_FD, x_hat, target, mask)
  e = np.asarray(target - x_hat)
  want = np.mean((np.asarray(codes @ dict_FD) - e)[[0, 2]] ** 2)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  # No dead latent: the codes are 0, the value is mean(residual²) and no gradient flows.
  zero = jnp.zeros_like(codes)
  np.testing.assert_allclose(losses.auxk(zero, dict_FD, x_hat, target, mask),
                             np.mean(e[[0, 2]] ** 2), rtol=1e-6)
  grads = jax.grad(lambda c, d, xh: losses.auxk(c * 0, d, xh, target, mask), (1, 2))(
      codes, dict_FD, x_hat)
  assert all(float(jnp.abs(g).max()) == 0 for g in grads)  # the residual is a constant
  # Logged at coefficient 0, weighted by alpha otherwise.
  terms = {"out_to_in": jnp.float32(2.0), "sparsity": jnp.float32(1.0), "auxk": value}
  coeffs = losses.default_coeffs(losses.LossConfig(), 0.5)
  assert float(coeffs.auxk) == np.float32(1 / 32)
  total, logs = losses.total_loss(terms, coeffs.replace(auxk=jnp.float32(0)))
  assert float(logs["auxk"]) == float(value) and float(total) == 2.5
  total, _ = losses.total_loss(terms, coeffs)
  np.testing.assert_allclose(total, 2.5 + float(value) / 32, rtol=1e-6)


def test_matryoshka_term_sums_the_prefix_reconstruction_losses():
  rng = np.random.default_rng(1)
  target = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  mask = jnp.array([True, True, False])
  prefixes = {m: jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for m in (2, 5)}
  terms = losses.compute_terms(losses.LossConfig(), d_in=4, codes=jnp.ones((3, 8)),
                               x_hat=target, target=target, mask=mask, prefix_x_hats=prefixes)
  each = {m: np.mean((np.asarray(x) - np.asarray(target))[:2] ** 2) for m, x in prefixes.items()}
  for m in (2, 5):
    np.testing.assert_allclose(terms[f"matryoshka/{m}"], each[m], rtol=1e-6)
  np.testing.assert_allclose(terms["matryoshka"], each[2] + each[5], rtol=1e-6)
  coeffs = losses.default_coeffs(losses.LossConfig(), 0.0)
  assert float(coeffs.matryoshka) == 1.0
  total, logs = losses.total_loss(terms, coeffs.replace(matryoshka=jnp.float32(0.5)))
  np.testing.assert_allclose(total, 0.5 * (each[2] + each[5]), rtol=1e-6)  # out_to_in is 0
  assert "matryoshka/2" in logs
  assert "matryoshka" not in losses.compute_terms(losses.LossConfig(), d_in=4,
                                                  codes=jnp.ones((3, 8)), x_hat=target,
                                                  target=target, mask=mask)


# ------------------------------------------------------------------------------------------------
# p-annealing.


@pytest.mark.parametrize("reduction", ["e2e_sae", "sum_batch"])
def test_annealed_sparsity_is_the_sum_of_powers_and_exact_at_p_one(reduction):
  codes = np.maximum(_randn(0, (B, T, F)), 0) - 0.1 * (_randn(1, (B, T, F)) > 1.5)  # some < 0
  m = _mask()
  scale = 1.0 if reduction == "sum_batch" else 1.0 / (D * m.sum())
  for p in (0.2, 0.5, 0.8):
    want = (np.abs(codes.astype(np.float64)) ** p).sum(-1)[m].sum() * scale  # no 1/p root
    got = _jit(lambda c, q: losses.sparsity_annealed(c, m, D, q, reduction))(codes, p)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # p = 1 (traced): the value and gradient of the static L1 penalty, bit for bit.
  static = lambda c: losses.sparsity(c, m, D, 1.0, 1.0, reduction)
  annealed = lambda c: losses.sparsity_annealed(c, m, D, jnp.float32(1.0), reduction)
  for fn in (lambda f: f, jax.grad):
    np.testing.assert_array_equal(_jit(fn(annealed))(codes), _jit(fn(static))(codes))
  g = _jit(jax.grad(lambda c: losses.sparsity_annealed(c, m, D, 0.3, reduction)))(codes)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[np.asarray(codes) == 0] == 0)


@pytest.mark.parametrize("reduction", ["e2e_sae", "sum_batch"])
def test_rescaled_annealed_sparsity_keeps_the_l1_value_with_the_lp_gradient(reduction):
  codes = np.maximum(_randn(0, (B, T, F)), 0)
  m = _mask()
  l1 = lambda c: losses.sparsity(c, m, D, 1.0, 1.0, reduction)
  lp = lambda c, q: losses.sparsity_annealed(c, m, D, q, reduction)
  scaled = lambda c, q, r: losses.sparsity_annealed(c, m, D, q, reduction, rescale=r)
  for p in (0.2, 0.5):
    # The value is the L1 penalty's; the gradient is Lp's times L1 / Lp (a constant).
    np.testing.assert_allclose(_jit(scaled)(codes, p, True), _jit(l1)(codes), rtol=1e-6)
    ratio = float(_jit(l1)(codes)) / float(_jit(lp)(codes, p))
    assert abs(ratio - 1) > 0.05  # a real rescaling: Σ c^p is not Σ c for these codes...
    np.testing.assert_allclose(_jit(jax.grad(scaled))(codes, p, True),
                               ratio * np.asarray(_jit(jax.grad(lp))(codes, p)), rtol=2e-5)
    # ...and off (traced False), the plain Lp penalty, bit for bit.
    for fn in (lambda f: f, jax.grad):
      np.testing.assert_array_equal(_jit(fn(lambda c: scaled(c, p, jnp.bool_(False))))(codes),
                                    _jit(fn(lambda c: lp(c, p)))(codes))
  # At p = 1 the factor is exactly 1: value and gradient of L1, bit for bit.
  for fn in (lambda f: f, jax.grad):
    np.testing.assert_array_equal(_jit(fn(lambda c: scaled(c, jnp.float32(1.0), True)))(codes),
                                  _jit(fn(l1))(codes))
  # All-zero codes: no division by zero, the penalty is 0.
  assert float(_jit(scaled)(np.zeros_like(codes), 0.5, True)) == 0.0


def test_anneal_p_follows_the_linear_schedule():
  steps = np.arange(30)
  for p_end, start, n in ((0.2, 5, 10), (0.5, 0, 1), (0.3, 7, 0)):
    p = np.asarray(jax.vmap(lambda s: losses.anneal_p(s, p_end, start, n))(steps))
    # Independently: 1 before start, then 1 + (p_end - 1) * min((s - start + 1) / n, 1).
    frac = np.where(steps < start, 0.0,
                    np.minimum((steps - start + 1) / n, 1.0) if n else 1.0)
    np.testing.assert_allclose(p, 1 + (p_end - 1) * frac, rtol=1e-6)
    assert p[-1] == np.float32(p_end) and np.all(np.diff(p) <= 0)
  assert np.all(np.asarray(jax.vmap(lambda s: losses.anneal_p(s, 1.0, 3, 8))(steps)) == 1.0)
  codes = jnp.ones((2, 3, 4))
  with pytest.raises(ValueError, match="p-annealing starts from p = 1"):
    losses.compute_terms(losses.LossConfig(sparsity_p=2.0), d_in=4, codes=codes,
                         x_hat=codes[..., :2], target=codes[..., :2], mask=None,
                         annealed_p=jnp.float32(0.5))

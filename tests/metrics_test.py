"""Metric formulas: explained variance against closed forms and NumPy, the output metrics (KL,
TV, CE, top-1, grammatical mass) against NumPy, and latent counts / density histograms on
hand-checked firing counts."""

import jax.numpy as jnp
import numpy as np

from jaxsae.grid import metrics


def test_explained_variance_closed_forms():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)) + 2.0, jnp.float32)
  mask = jnp.asarray(rng.random((3, 5)) < 0.7)
  mean = np.asarray(x)[np.asarray(mask)].mean(0)
  for form in ("token_mean", "ratio_of_sums"):
    assert float(metrics.explained_variance(x, x, mask, form=form)) == 1.0
    # Predicting the token mean explains nothing, in both forms.
    x_mean = jnp.broadcast_to(jnp.asarray(mean), x.shape)
    np.testing.assert_allclose(float(metrics.explained_variance(x_mean, x, mask, form=form)), 0.0,
                               atol=1e-5)
  # The layer-normed form is blind to rescaling the reconstruction.
  np.testing.assert_allclose(
      float(metrics.explained_variance(3.0 * x, x, mask, layernorm=True)), 1.0, atol=1e-4)
  assert float(metrics.explained_variance(3.0 * x, x, mask)) < 0
  # NumPy references of both forms on a random reconstruction.
  x_hat = x + 0.5 * jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  xn, xh, m = np.asarray(x, np.float64), np.asarray(x_hat, np.float64), np.asarray(mask)
  err = ((xh - xn) ** 2).sum(-1)[m]
  var = ((xn - mean) ** 2).sum(-1)[m]
  np.testing.assert_allclose(float(metrics.explained_variance(x_hat, x, mask)),
                             np.mean(1 - err / var), rtol=1e-5)
  np.testing.assert_allclose(
      float(metrics.explained_variance(x_hat, x, mask, form="ratio_of_sums")),
      1 - err.sum() / var.sum(), rtol=1e-5)


def test_output_metrics_match_numpy():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(4, 6, 7)) * 2
  b = a + rng.normal(size=a.shape)
  b[0, 0] = a[0, 0]  # one position where the distributions coincide
  targets = rng.integers(0, 7, size=(4, 6))
  valid = rng.random(a.shape) < 0.4
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p, q = softmax(a), softmax(b)
  ref = {"kl": (p * (np.log(p) - np.log(q))).sum(-1), "tv": 0.5 * np.abs(p - q).sum(-1),
         "ce": -np.log(np.take_along_axis(q, targets[..., None], -1)[..., 0]),
         "top1": (a.argmax(-1) == b.argmax(-1)).astype(float), "mass": (q * valid).sum(-1)}
  aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  got = {"kl": metrics.token_kl(aj, bj), "tv": metrics.token_total_variation(aj, bj),
         "ce": metrics.token_cross_entropy(bj, jnp.asarray(targets)),
         "top1": metrics.token_top1_agreement(aj, bj),
         "mass": metrics.token_grammatical_mass(bj, jnp.asarray(valid))}
  for k in ref:
    np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert abs(float(metrics.token_kl(aj, bj)[0, 0])) < 1e-6
  x_hat, x = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  np.testing.assert_allclose(np.asarray(metrics.token_sq_error(jnp.asarray(x_hat), jnp.asarray(x))),
                             ((x_hat - x) ** 2).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(metrics.ce_recovered(3.0, [3.0, 2.0, 1.0], 1.0), [0.0, 0.5, 1.0])


def test_latent_counts_and_density_histogram():
  fired = np.array([[0, 1, 5, 11, 50, 100], [0, 0, 0, 0, 0, 10]])
  c = metrics.latent_counts(fired, window=100)
  np.testing.assert_array_equal(c["alive"], [5, 1])
  np.testing.assert_array_equal(c["dead"], [1, 5])
  np.testing.assert_array_equal(c["dense"], [3, 0])  # > 10%: 11, 50, 100 (10 is not)
  np.testing.assert_allclose(c["dead_fraction"], [1 / 6, 5 / 6])
  hist = metrics.density_histogram(fired, window=100)
  assert hist.shape == (2, len(metrics.DENSITY_BIN_EDGES) - 1)
  np.testing.assert_array_equal(hist.sum(-1), c["alive"])
  # log10 frequencies -2, -1.30, -0.96, -0.30, 0 -> bins of width 0.5 starting at -6.
  expected = np.zeros(12, int)
  for b in (8, 9, 10, 11, 11):
    expected[b] += 1
  np.testing.assert_array_equal(hist[0], expected)
  assert hist[1, 10] == 1  # frequency 0.1: log10 = -1, the left edge of bin 10
  assert metrics.density_histogram(np.array([1]), window=10**9)[0] == 1  # below 1e-6: first bin

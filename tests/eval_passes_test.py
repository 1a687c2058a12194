"""Paired standard errors of per-token means over held-out sequences (`eval_passes.ratio_se`)."""

import numpy as np

from jaxsae.evaluation import eval_passes


def test_ratio_se_of_equal_lengths_is_the_standard_error_of_sequence_means():
  rng = np.random.default_rng(0)
  num_NS = rng.normal(size=(3, 40)) * 7.0 + 2.0
  den_S = np.full(40, 7.0)
  want = np.std(num_NS / 7.0, axis=1, ddof=1) / np.sqrt(40)
  np.testing.assert_allclose(eval_passes.ratio_se(num_NS, den_S), want, rtol=1e-12)


def test_ratio_se_matches_the_spread_of_the_ratio_over_resampled_sequences():
  # Sequences of different lengths whose per-token values correlate within a sequence: the
  # ratio's sampling spread over many independent draws is what the estimator predicts.
  rng = np.random.default_rng(1)
  s, draws = 200, 2000
  ratios, ses = [], []
  for _ in range(draws):
    n_S = rng.integers(3, 30, size=s).astype(np.float64)
    seq_effect = rng.normal(0.5, 1.0, size=s)  # shared by a sequence's tokens
    num_S = n_S * seq_effect + rng.normal(size=s) * np.sqrt(n_S)
    ratios.append(num_S.sum() / n_S.sum())
    ses.append(eval_passes.ratio_se(num_S[None], n_S)[0])
  assert abs(np.mean(ses) / np.std(ratios) - 1.0) < 0.08


def test_ratio_se_needs_two_sequences():
  assert np.isnan(eval_passes.ratio_se(np.ones((2, 1)), np.ones(1))).all()

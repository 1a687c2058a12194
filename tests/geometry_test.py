"""Dictionary geometry: max cosine within and across dictionaries against brute force and
constructed cases (orthonormal, duplicated and permuted directions), cross-seed consistency, and
input validation."""

import numpy as np
import pytest

from jaxsae.analysis import geometry


def test_max_cosine_within_and_across_dictionaries():
  rng = np.random.default_rng(6)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  ortho = q[:5]  # 5 orthonormal directions in D = 8
  within = geometry.dictionary_similarity(ortho)
  np.testing.assert_allclose(within.max_cos, 0.0, atol=1e-6)
  dup = np.concatenate([ortho, 2.5 * ortho[1:2]])  # row 5 duplicates row 1 (rescaled)
  sim = geometry.dictionary_similarity(dup)
  np.testing.assert_allclose(sim.max_cos[[1, 5]], 1.0, atol=1e-6)
  np.testing.assert_allclose(np.delete(sim.max_cos, [1, 5]), 0.0, atol=1e-6)
  assert sim.frac_above == pytest.approx(2 / 6)
  assert sim.summary()["frac_above_0.9"] == sim.frac_above
  rand = rng.normal(size=(12, 8))
  cross = geometry.dictionary_similarity(rand, rand)
  np.testing.assert_allclose(cross.max_cos, 1.0, atol=1e-6)
  assert cross.mean == pytest.approx(1.0, abs=1e-6) and cross.median == pytest.approx(1.0, abs=1e-6)
  # Brute force within-SAE on random directions.
  unit = rand / np.linalg.norm(rand, axis=1, keepdims=True)
  cos = unit @ unit.T
  np.fill_diagonal(cos, -np.inf)
  np.testing.assert_allclose(geometry.dictionary_similarity(rand).max_cos, cos.max(1), atol=1e-5)
  assert geometry.cross_seed_consistency([rand, rand[rng.permutation(12)]]) == pytest.approx(
      1.0, abs=1e-6)
  assert geometry.cross_seed_consistency([q[:4], q[4:], q[4:]]) == pytest.approx(
      (4 * 0.0 + 2 * 1.0) / 6, abs=1e-6)  # ordered pairs: only (q[4:], q[4:]) twice match
  with pytest.raises(ValueError, match="at least 2 dictionaries"):
    geometry.cross_seed_consistency([rand])


def test_zero_directions_and_bad_inputs():
  d = np.zeros((3, 4))
  d[0, 0] = 1.0
  d[1, 0] = -2.0  # anti-parallel to row 0: cosine -1; row 2 is zero: cosine 0 with everything
  np.testing.assert_allclose(geometry.dictionary_similarity(d).max_cos, [0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match=r"must be \[F, D\]"):
    geometry.dictionary_similarity(np.zeros(4))
  with pytest.raises(ValueError, match="at least 2 directions"):
    geometry.dictionary_similarity(np.ones((1, 4)))
  with pytest.raises(ValueError, match="different spaces"):
    geometry.dictionary_similarity(np.ones((3, 4)), np.ones((3, 5)))

"""The LM's length match (`jaxsae.lm.lengths`): zero against itself, the null, the buckets."""

import numpy as np
import pytest

from jaxsae.lm import lengths


def test_data_against_itself_is_zero_and_inside_its_null():
  rng = np.random.default_rng(0)
  data = rng.geometric(0.15, size=2000) + 1
  m = lengths.length_match(data, np.ones_like(data, bool), np.ones_like(data, bool), data)
  assert m["tv"] == 0.0
  assert 0.0 < m["tv_null"]["mean"] <= m["tv_null"]["p95"] < 0.1
  assert sum(m["generated_counts"]) == sum(m["data_counts"]) == 2000


def test_short_generations_are_far_and_bucketed_by_the_data_quantiles():
  rng = np.random.default_rng(1)
  data = rng.integers(2, 30, size=4000)
  gen = rng.integers(2, 8, size=640)  # the shortest buckets only
  ok = gen % 2 == 0
  m = lengths.length_match(gen, np.ones_like(gen, bool), ok, data)
  # Buckets of about 1/8 of the data each: generations all in the first couple of buckets.
  assert len(m["edges"]) == 8 and m["edges"][-1] == data.max()
  p_gen = np.array(m["generated_counts"]) / 640
  p_data = np.array(m["data_counts"]) / 4000
  assert m["tv"] == pytest.approx(0.5 * np.abs(p_gen - p_data).sum())
  assert m["tv"] > 0.6 > m["tv_null"]["p95"]
  first = m["buckets"][0]
  sel = gen <= m["edges"][0]
  assert first["generations"] == sel.sum()
  assert first["grammatical"]["value"] == pytest.approx(ok[sel].mean())


def test_unfinished_generations_land_in_the_overflow_bucket():
  data = np.arange(1, 101)
  gen = np.full(10, 50)
  finished = np.array([True] * 6 + [False] * 4)
  m = lengths.length_match(gen, finished, finished, data)
  assert m["generated_counts"][-1] == 4
  assert m["buckets"][-1]["generations"] == 4
  assert m["buckets"][-1]["grammatical"]["value"] == 0.0
  assert m["mean_length"]["generated"] == 50.0


def test_mismatched_inputs_are_refused():
  with pytest.raises(ValueError, match="one entry per generation"):
    lengths.length_match(np.ones(3), np.ones(2, bool), np.ones(3, bool), np.arange(5))

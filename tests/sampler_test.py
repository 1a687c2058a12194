"""Tests for the compiled sampler: format, determinism, and statistics.

The statistical tests compare ≥ 20,000 samples per grammar with (a) the exact length
distribution computed independently by dynamic programming over the rules and (b) the spec's
reference table, with tolerances derived from standard errors (z = 5 against exact values;
against the spec, whose numbers are themselves 20k-sample estimates, the standard error of the
difference, sqrt(2)·SE, plus half a unit of the table's rounding).
"""

import math
import random

import jax
import numpy as np
import pytest

import reference_grammars as ref
from jaxsae import grammars
from jaxsae.grammars import sampler

N_STATS = 20_000
Z = 5.0


@pytest.fixture(scope="module")
def big_batches():
  return {name: grammars.sample(jax.random.key(2024), grammars.get(name), N_STATS)
          for name in grammars.names()}


def test_format(big_batches):
  for name, batch in big_batches.items():
    g = grammars.get(name)
    toks = np.asarray(batch.tokens)
    lengths = np.asarray(batch.lengths)
    assert toks.shape == (N_STATS, 128) and toks.dtype == np.int32
    np.testing.assert_array_equal(toks[:, :7], np.array(g.decorator_ids)[None].repeat(N_STATS, 0))
    assert lengths.min() >= 1 and lengths.max() <= 110
    pos = np.arange(128)[None]
    sent = (pos >= 7) & (pos < 7 + lengths[:, None])
    np.testing.assert_array_equal(np.asarray(batch.sentence_mask), sent)
    assert (toks[sent] < g.n_terminals).all()
    np.testing.assert_array_equal(toks[np.arange(N_STATS), 7 + lengths], g.eos_id)
    assert (toks[pos > 7 + lengths[:, None]] == g.pad_id).all()


def test_every_sample_is_grammatical(big_batches):
  # All 20k for the linear-time recognisers; CKY is O(n^3), so 300 English sentences and 32
  # of each English variant (whose sentences are mostly near the 110-token limit).
  for name, batch in big_batches.items():
    g = grammars.get(name)
    n = N_STATS if g.kind != "pcfg" else (300 if name == "english" else 32)
    toks = batch.tokens[:n]
    assert bool(np.all(grammars.is_grammatical(g, toks))), name


def test_same_key_same_batch_and_lane_independence():
  g = grammars.get("dyck2")
  key = jax.random.key(7)
  a = grammars.sample(key, g, 64)
  b = grammars.sample(key, g, 64)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  c = grammars.sample(key, g, 64, lanes=5)
  np.testing.assert_array_equal(a.tokens, c.tokens)
  d = grammars.sample(key, g, 200)  # sentence s depends on (key, s) only
  np.testing.assert_array_equal(a.tokens, d.tokens[:64])
  e = grammars.sample(jax.random.key(8), g, 64)
  assert not np.array_equal(a.tokens, e.tokens)


def test_jit_matches_eager_and_no_recompilation():
  g = grammars.get("expr_prefix")
  key = jax.random.key(3)
  eager = grammars.sample(key, g, 32, max_len=64)
  jitted = jax.jit(lambda k, gr: grammars.sample(k, gr, 32, max_len=64))(key, g)
  np.testing.assert_array_equal(eager.tokens, jitted.tokens)
  before = sampler._sample._cache_size()  # pylint: disable=protected-access
  for seed in range(3):
    grammars.sample(jax.random.key(seed), g, 32, max_len=64)
  assert sampler._sample._cache_size() == before  # pylint: disable=protected-access


def test_max_len_and_bad_arguments():
  g = grammars.get("dyck2")
  batch = grammars.sample(jax.random.key(0), g, 256, max_len=40)
  assert int(batch.lengths.max()) <= 40 - 18
  assert bool(np.all(grammars.is_grammatical(g, batch.tokens)))
  with pytest.raises(ValueError, match="max_len"):
    grammars.sample(jax.random.key(0), g, 4, max_len=19)
  with pytest.raises(ValueError, match="batch_size"):
    grammars.sample(jax.random.key(0), g, 0)
  with pytest.raises(TypeError, match="Grammar"):
    grammars.sample(jax.random.key(0), "dyck2", 4)


# --- statistics against the exact distribution ------------------------------------------------

def _rejection_rate(batch):
  rej = int(np.asarray(batch.rejections).sum())
  return rej / (rej + N_STATS), rej + N_STATS


@pytest.mark.parametrize("name", grammars.names())
def test_length_distribution_matches_exact(big_batches, name):
  g = grammars.get(name)
  rules = ref.read_rules(g.info.text)
  p = ref.exact_length_distribution(rules, g.info.nonterminals[0], 110)
  accept = p.sum()
  q = p / accept
  lengths = np.asarray(big_batches[name].lengths)
  # Rejection rate: draws are Bernoulli(1 - accept).
  r_hat, draws = _rejection_rate(big_batches[name])
  r = 1 - accept
  assert abs(r_hat - r) <= Z * math.sqrt(max(r * (1 - r), 1e-12) / draws) + 1e-9, (r_hat, r)
  # Mean and the whole CDF (pointwise binomial standard errors).
  mu = (q * np.arange(111)).sum()
  sd = math.sqrt((q * (np.arange(111) - mu) ** 2).sum())
  assert abs(lengths.mean() - mu) <= Z * sd / math.sqrt(N_STATS), (lengths.mean(), mu)
  cdf = np.cumsum(q)
  emp = np.searchsorted(np.sort(lengths), np.arange(111), side="right") / N_STATS
  se = np.sqrt(np.clip(cdf * (1 - cdf), 0, None) / N_STATS) + 1e-12
  assert np.all(np.abs(emp - cdf) <= Z * se + 1e-9), np.max(np.abs(emp - cdf) / se)


# --- statistics against the spec's reference table -------------------------------------------

SPEC = {  # rejected, mean, median, p90, (max depth mean, p90)
    "dyck2": (0.053, 11.7, 4, 30, (2.75, 6)),
    "dyck2_p03": (0.002, 7.1, 4, 16, (1.77, 3)),
    "expr_prefix": (0.003, 4.8, 1, 11, None),
    "english": (0.0, 7.6, 5, 15, None),
}


def _plausible_quantile(x, q, value, z):
  """value is a plausible q-quantile of x: the empirical CDF brackets q within z SEs."""
  se = math.sqrt(q * (1 - q) / len(x)) * math.sqrt(2)
  return np.mean(x < value) <= q + z * se and np.mean(x <= value) >= q - z * se


def _close(estimate, spec, se, rounding):
  return abs(estimate - spec) <= Z * math.sqrt(2) * se + rounding


@pytest.mark.parametrize("name", sorted(SPEC))
def test_statistics_match_spec_table(big_batches, name):
  rejected, mean, median, p90, depth = SPEC[name]
  batch = big_batches[name]
  lengths = np.asarray(batch.lengths).astype(float)
  r_hat, draws = _rejection_rate(batch)
  assert _close(r_hat, rejected, math.sqrt(max(rejected * (1 - rejected), 1e-6) / draws), 5e-4)
  assert _close(lengths.mean(), mean, lengths.std() / math.sqrt(N_STATS), 0.05)
  assert _plausible_quantile(lengths, 0.5, median, Z)
  assert _plausible_quantile(lengths, 0.9, p90, Z)
  if depth is not None:
    lab = grammars.labels(grammars.get(name), batch.tokens)
    max_depth = np.asarray(lab["depth_after"]).max(axis=1).astype(float)
    assert _close(max_depth.mean(), depth[0], max_depth.std() / math.sqrt(N_STATS), 0.005)
    assert _plausible_quantile(max_depth, 0.9, depth[1], Z)


def _mix_ok(tokens, lengths, groups, spec):
  """Token shares per group vs the spec, with ratio-estimator (per-sentence) standard errors."""
  toks = np.asarray(tokens)[:, 7:]
  lengths = np.asarray(lengths)
  mask = np.arange(toks.shape[1])[None] < lengths[:, None]
  for name, ids in groups.items():
    counts = (np.isin(toks, ids) & mask).sum(axis=1)
    share = counts.sum() / lengths.sum()
    resid = counts - share * lengths
    se = resid.std() / (math.sqrt(len(lengths)) * lengths.mean())
    assert _close(share, spec[name], se, 5e-4), (name, share, spec[name], se)


def test_token_mix_matches_spec(big_batches):
  b = big_batches["expr_prefix"]
  _mix_ok(b.tokens, b.lengths, {"dig": list(range(10))}, {"dig": 0.608})
  b = big_batches["english"]
  cats = {c: list(range(10 * i, 10 * i + 10))
          for i, c in enumerate(["noun", "verb", "adj", "pro", "adv", "conj"])}
  spec = {"adj": 0.236, "noun": 0.236, "verb": 0.177, "conj": 0.161, "pro": 0.117, "adv": 0.073}
  _mix_ok(b.tokens, b.lengths, cats, spec)
  # Operators are ≈13% each: exactly equal shares in expectation (0.33/0.33/0.34 rule weights).
  b = big_batches["expr_prefix"]
  toks = np.asarray(b.tokens)
  un, bi, te = (((toks >= lo) & (toks < lo + 3)).sum() for lo in (10, 13, 16))
  assert abs(un / bi - 1) < 0.05 and abs(te / bi - 0.34 / 0.33) < 0.05


def test_recursive_reference_sampler_agrees_on_mean_length():
  """A plain recursive sampler (independent code) gives the same mean length."""
  g = grammars.get("english")
  rules = ref.read_rules(g.info.text)
  rng = random.Random(0)
  lens = [len(ref.recursive_sample(rules, "S", rng, 110)) for _ in range(5000)]
  ours = np.asarray(grammars.sample(jax.random.key(1), g, 5000).lengths)
  se = math.sqrt(np.var(lens) / 5000 + np.var(ours) / 5000)
  assert abs(np.mean(lens) - ours.mean()) <= Z * se

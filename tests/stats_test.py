"""Statistics: interval coverage in simulation (Wilson for a known binomial, mean ± z·SE for a
normal mean, the percentile bootstrap), against the exact binomial coverage; paired differences
against hand-computed values; the null test's size and power; total variation against a hand
count; the text of estimates.

Simulation tolerances come from the number of simulations: an empirical coverage over S runs
has SE √(c(1 − c)/S), and a check allows 4 of them (a false failure about 1 in 16,000), plus the
interval's own known deviation from nominal where there is one (discreteness, z instead of t).
"""

import math

import numpy as np
import pytest

from jaxsae.core import stats


def _binomial_pmf(n, p):
  k = np.arange(n + 1)
  logc = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
  return np.exp(logc + k * math.log(p) + (n - k) * math.log1p(-p))


def _sim_tolerance(coverage, sims):
  return 4 * math.sqrt(coverage * (1 - coverage) / sims)


def test_z_value():
  assert stats.z_value(0.95) == pytest.approx(1.959963984540054, rel=1e-12)
  assert stats.z_value(0.6826894921370859) == pytest.approx(1.0, rel=1e-9)
  with pytest.raises(ValueError, match="confidence"):
    stats.z_value(1.0)


def test_wilson_interval_closed_form_and_edges():
  # Hand-evaluated Wilson formula at k = 8, n = 10, z = 1.96.
  z = stats.z_value()
  p, n = 0.8, 10
  centre = (p + z * z / 20) / (1 + z * z / 10)
  half = z / (1 + z * z / 10) * math.sqrt(p * (1 - p) / 10 + z * z / 400)
  assert stats.wilson_interval(8, 10) == pytest.approx((centre - half, centre + half), rel=1e-12)
  lo, hi = stats.wilson_interval(0, 640)  # k = 0: not degenerate
  assert lo == 0.0 and 0 < hi < 0.01
  lo, hi = stats.wilson_interval(640, 640)
  assert hi == 1.0 and 0.99 < lo < 1
  est = stats.fraction(630, 640)
  assert est["value"] == pytest.approx(630 / 640) and est["lo"] < est["value"] < est["hi"]
  assert est["n"] == 640 and est["successes"] == 630 and est["method"] == "wilson"
  assert math.isnan(stats.fraction(0, 0)["value"])
  with pytest.raises(ValueError, match="successes"):
    stats.wilson_interval(5, 4)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.97])
def test_wilson_coverage_of_a_known_binomial(p):
  n, sims, conf = 640, 4000, 0.95
  # Exact coverage: the binomial probability of the k whose interval holds p.
  pmf = _binomial_pmf(n, p)
  covers = np.array([lo <= p <= hi for lo, hi in (stats.wilson_interval(k, n)
                                                   for k in range(n + 1))])
  exact = float(pmf[covers].sum())
  assert abs(exact - conf) < 0.01  # Wilson at n = 640: within a point of nominal
  # Simulated coverage agrees with the exact one within the simulation's resolution.
  k = np.random.default_rng(int(p * 100)).binomial(n, p, size=sims)
  simulated = float(np.mean(covers[k]))
  assert abs(simulated - exact) <= _sim_tolerance(exact, sims)
  assert abs(simulated - conf) <= _sim_tolerance(conf, sims) + 0.01


def test_mean_se_closed_form():
  x = np.array([1.0, 2.0, 4.0, 7.0, np.nan])
  est = stats.mean_se(x)
  se = np.std([1, 2, 4, 7], ddof=1) / 2
  assert (est["value"], est["n"]) == (3.5, 4)
  assert est["se"] == pytest.approx(se, rel=1e-12)
  assert (est["lo"], est["hi"]) == pytest.approx((3.5 - 1.959964 * se, 3.5 + 1.959964 * se))
  one = stats.mean_se([2.0])
  assert one["value"] == 2.0 and math.isnan(one["se"]) and one["n"] == 1


def test_mean_se_coverage_of_a_normal_mean():
  n, sims, mu = 100, 4000, 1.3
  x = np.random.default_rng(0).normal(mu, 2.0, size=(sims, n))
  hits = [(e["lo"] <= mu <= e["hi"]) for e in map(stats.mean_se, x)]
  # z instead of t at 99 degrees of freedom: true coverage 0.9472, not 0.95.
  assert abs(np.mean(hits) - 0.95) <= _sim_tolerance(0.95, sims) + 0.005


def test_paired_difference():
  rng = np.random.default_rng(1)
  unit = rng.normal(0.0, 1.0, 500)  # per-sequence difficulty, shared by both measurements
  clean = 2.0 + unit + rng.normal(0.0, 0.01, 500)
  spliced = clean + 0.003 + rng.normal(0.0, 0.01, 500)
  d = spliced - clean
  est = stats.paired_difference(clean, spliced)
  assert est["value"] == pytest.approx(d.mean(), rel=1e-12)
  assert est["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(500), rel=1e-12)
  assert est["significant"] and est["lo"] > 0
  # Unpaired, the shared spread would swamp a difference of 0.003.
  assert est["se"] < 0.05 * math.hypot(stats.mean_se(clean)["se"], stats.mean_se(spliced)["se"])
  same = stats.paired_difference(clean, clean + rng.normal(0.0, 0.01, 500))
  assert same["significant"] == (not same["lo"] <= 0 <= same["hi"])
  nan = stats.paired_difference([1.0, np.nan, 3.0], [2.0, 5.0, np.inf])
  assert nan["n"] == 1 and not nan["significant"]
  with pytest.raises(ValueError, match="same units"):
    stats.paired_difference([1.0, 2.0], [1.0])


def test_bootstrap_is_deterministic_and_matches_data():
  x = np.random.default_rng(2).normal(size=12)
  a = stats.bootstrap_interval(x, seed=3)
  assert a == stats.bootstrap_interval(x, seed=3)
  assert a != stats.bootstrap_interval(x, seed=4)
  assert a["value"] == pytest.approx(x.mean()) and a["lo"] < a["value"] < a["hi"]
  # Percentile bootstrap SE of the mean ≈ the plug-in SE s·√((n−1)/n)/√n.
  big = stats.bootstrap_interval(x, n_boot=20000, seed=0)
  assert big["se"] == pytest.approx(x.std(ddof=0) / math.sqrt(12), rel=0.03)
  med = stats.bootstrap_interval(x, np.median)
  assert med["value"] == pytest.approx(np.median(x))
  one = stats.bootstrap_interval([4.0])
  assert (one["value"], one["lo"], one["hi"], one["se"], one["n"]) == (4.0, 4.0, 4.0, 0.0, 1)
  with pytest.raises(ValueError, match="at least one unit"):
    stats.bootstrap_interval([])


def test_bootstrap_coverage_roughly_nominal():
  n, sims, mu = 50, 400, -0.7
  x = np.random.default_rng(5).normal(mu, 1.0, size=(sims, n))
  hits = [stats.bootstrap_interval(row, n_boot=500, seed=i)["lo"] <= mu
          <= stats.bootstrap_interval(row, n_boot=500, seed=i)["hi"]
          for i, row in enumerate(x)]
  # The percentile bootstrap of a mean undercovers slightly at n = 50 (about 0.94).
  assert abs(np.mean(hits) - 0.95) <= _sim_tolerance(0.95, sims) + 0.01


def test_null_test_planted_effect_passes():
  null = np.random.default_rng(6).normal(size=999)
  res = stats.null_test(5.0, null)
  assert res["significant"] and res["p_value"] == pytest.approx(1 / 1000)
  assert res["null_quantile"] == pytest.approx(np.quantile(null, 0.95))
  low = stats.null_test(-5.0, null)
  assert not low["significant"] and low["p_value"] == 1.0  # one-sided: a large negative fails
  assert not stats.null_test(5.0, null[:10])["significant"]  # 10 draws cannot reach 5%
  assert not stats.null_test(math.nan, null)["significant"]


def test_min_null_size_is_the_least_null_that_can_pass():
  for confidence, m in ((0.95, 19), (0.99, 99), (0.9, 9), (0.5, 1)):
    assert stats.min_null_size(confidence) == m
    null = np.zeros(m)
    assert stats.null_test(1.0, null, confidence=confidence)["significant"]
    assert not stats.null_test(1.0, null[:-1], confidence=confidence)["significant"]
  with pytest.raises(ValueError, match="confidence"):
    stats.min_null_size(1.0)


def test_null_test_noise_passes_at_the_nominal_rate():
  sims, m = 4000, 99
  draws = np.random.default_rng(7).normal(size=(sims, m + 1))
  passed = [stats.null_test(d[0], d[1:])["significant"] for d in draws]
  for res, d in zip(map(stats.null_test, draws[:20, 0], draws[:20, 1:]), draws[:20]):
    if res["significant"]:
      assert res["effect"] > res["null_quantile"]
  # Exchangeable draws: P(p <= 0.05) = 5/100 exactly.
  assert abs(np.mean(passed) - 0.05) <= _sim_tolerance(0.05, sims)


def test_sign_flip_null_size_and_power():
  rng = np.random.default_rng(8)
  sims, n = 1000, 30
  d = rng.normal(0.0, 1.0, size=(sims, n))
  passed = [stats.null_test(row.mean(), stats.sign_flip_null(row, n_null=199, seed=i))
            ["significant"] for i, row in enumerate(d)]
  assert abs(np.mean(passed) - 0.05) <= _sim_tolerance(0.05, sims)
  planted = d[0] + 1.0
  assert stats.null_test(planted.mean(), stats.sign_flip_null(planted, seed=1))["significant"]
  np.testing.assert_array_equal(stats.sign_flip_null(planted, seed=2),
                                stats.sign_flip_null(planted, seed=2))


def test_total_variation():
  lengths = np.random.default_rng(9).integers(1, 30, size=500)
  counts = np.bincount(lengths)
  assert stats.total_variation(counts, counts) == 0.0
  assert stats.total_variation(counts, 7 * counts) == pytest.approx(0.0, abs=1e-15)
  # Hand count: p = (0.25, 0.5, 0.25) on {0, 1, 2}; q = 0.5 on {1, 3}.
  # ½(|0.25 − 0| + |0.5 − 0.5| + |0.25 − 0| + |0 − 0.5|) = 0.5.
  assert stats.total_variation([1, 2, 1], {1: 1, 3: 1}) == pytest.approx(0.5, abs=1e-15)
  assert stats.total_variation([0.2, 0.8], [0.8, 0.2, 0.0]) == pytest.approx(0.6)
  assert stats.total_variation([1, 0], [0, 1]) == 1.0
  p, q = np.random.default_rng(10).random((2, 8))
  assert stats.total_variation(p, q) == pytest.approx(stats.total_variation(q, p))
  with pytest.raises(ValueError, match="non-negative"):
    stats.total_variation([1, -1, 2], [1])
  with pytest.raises(ValueError, match="1-D"):
    stats.total_variation(np.ones((2, 2)), [1])


def test_format_estimate():
  assert stats.format_estimate({"value": 0.98437, "se": 0.0049}, style="se") == "0.9844 ± 0.0049"
  diff = {"value": 0.0123, "se": 0.0068, "lo": -0.001, "hi": 0.0256}
  assert stats.format_estimate(diff) == "0.012 [-0.001, 0.026]"
  assert stats.format_estimate(diff, difference=True) == "0.012 [-0.001, 0.026] (not significant)"
  paired = dict(diff, lo=0.0011, significant=True)
  assert stats.format_estimate(paired) == "0.012 [0.001, 0.026]"
  assert stats.format_estimate(dict(diff, significant=False), style="se") == (
      "0.0123 ± 0.0068 (not significant)")
  assert stats.format_estimate({"value": 2.5, "se": None}, style="se") == "2.5"
  assert stats.format_estimate({"value": 1234.5678, "lo": 1200.0, "hi": 1300.0}) == (
      "1235 [1200, 1300]")
  assert stats.format_estimate(None) == "—"
  assert stats.format_estimate({"value": math.nan, "lo": 0.1, "hi": 0.2}) == "—"
  with pytest.raises(ValueError, match="style"):
    stats.format_estimate({"value": 1.0}, style="pm")

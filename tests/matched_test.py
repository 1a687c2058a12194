"""Matched comparison: Pareto fronts against brute force; the coverage rule (refuses to
interpolate across a wide gap or outside the front, interpolates within a narrow one, exactly on
a log-linear front); configurations of several seeds and their bootstrap intervals (closed form
for three seeds); frozen points left out; the sentences."""

import itertools
import math

import numpy as np
import pytest

from jaxsae.analysis import comparison
from jaxsae.analysis import matched
from jaxsae.core import stats


# ------------------------------------------------------------------------------------------------
# Pareto fronts.


def _brute_front(x, y, hx, hy):
  better = lambda a, b, high: a > b if high else a < b
  noworse = lambda a, b, high: a >= b if high else a <= b
  front = set()
  for i in range(len(x)):
    if not (np.isfinite(x[i]) and np.isfinite(y[i])):
      continue
    dominated = any(
        np.isfinite(x[j]) and np.isfinite(y[j]) and noworse(x[j], x[i], hx)
        and noworse(y[j], y[i], hy) and (better(x[j], x[i], hx) or better(y[j], y[i], hy))
        for j in range(len(x)))
    if not dominated:
      front.add(i)
  return front


@pytest.mark.parametrize("hx, hy", list(itertools.product([False, True], repeat=2)))
def test_pareto_front_matches_brute_force(hx, hy):
  rng = np.random.default_rng(int(hx) * 2 + int(hy))
  for _ in range(20):
    n = int(rng.integers(1, 30))
    x = rng.integers(0, 6, n).astype(float)  # small integers: many ties and duplicates
    y = rng.integers(0, 6, n).astype(float)
    x[rng.random(n) < 0.1] = np.nan
    y[rng.random(n) < 0.05] = np.inf
    got = matched.pareto_front(x, y, higher_x_better=hx, higher_y_better=hy)
    assert set(got.tolist()) == _brute_front(x, y, hx, hy)
    assert len(got) == len(set(got.tolist()))
    assert np.all(np.diff(x[got]) >= 0)  # ordered by x


def test_pareto_front_rejects_bad_shapes():
  with pytest.raises(ValueError, match="equal length"):
    matched.pareto_front([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------------------
# The coverage rule.


def _log_front(x):
  return 12.0 - 2.0 * math.log(x)  # L0 linear in log CE increase


def test_interpolates_within_a_narrow_gap_exactly_on_a_log_linear_front():
  fx = [0.01, 0.02, 0.05, 0.1, 0.3]  # neighbours at most 3× apart
  fy = [_log_front(v) for v in fx]
  for x in np.geomspace(0.0101, 0.299, 25):
    y, why = matched.interpolate_front(float(x), fx, fy)
    assert why is None and y == pytest.approx(_log_front(x), rel=1e-12)
  assert matched.interpolate_front(0.05, fx, fy) == (fy[2], None)  # on a front point
  assert matched.interpolate_front(0.3, fx, fy) == (fy[4], None)


def test_refuses_to_interpolate_across_a_wide_gap():
  # The English front of the issue: neighbours 4,000× apart in CE increase.
  fx, fy = [0.00097, 4.03], [5.35, 0.52]
  y, why = matched.interpolate_front(0.05, fx, fy)
  assert y is None and "not covered" in why and "4.15e+03× apart" in why
  assert matched.interpolate_front(0.05, fx, fy, max_gap_factor=5000.0)[0] == pytest.approx(
      5.35 + (0.52 - 5.35) * math.log(0.05 / 0.00097) / math.log(4.03 / 0.00097), rel=1e-12)
  # The gap rule is ≤: exactly max_gap_factor apart is covered, a hair more is not.
  assert matched.interpolate_front(0.2, [0.1, 0.4], [2.0, 1.0])[1] is None
  assert matched.interpolate_front(0.2, [0.1, 0.40001], [2.0, 1.0])[0] is None
  for x in (1e-4, 5.0):
    y, why = matched.interpolate_front(x, fx, fy)
    assert y is None and why.startswith("outside range")
  # No gap in log space next to a front point at CE increase <= 0.
  y, why = matched.interpolate_front(0.001, [-0.0005, 0.002], [9.0, 8.0], max_gap_factor=1e9)
  assert y is None and "≤ 0" in why
  assert matched.interpolate_front(-0.0005, [-0.0005, 0.002], [9.0, 8.0]) == (9.0, None)
  with pytest.raises(ValueError, match="max_gap_factor"):
    matched.interpolate_front(0.2, fx, fy, max_gap_factor=0.5)


def test_matched_comparison_coverage_and_ratios():
  xs = [0.01, 0.02, 0.04, 0.08, 5.0]  # the last point lies 62.5× beyond its neighbour
  local = [{"id": f"l{i}", "ce_increase": x, "l0": _log_front(x)} for i, x in enumerate(xs)]
  local.append({"id": "dominated", "ce_increase": 0.03, "l0": 90.0})  # must not bend the front
  local.append({"id": "broken", "ce_increase": "nan", "l0": 1.0})
  e2e = [{"id": "a", "ce_increase": 0.03, "l0": 0.5 * _log_front(0.03)},
         {"id": "b", "ce_increase": 0.015, "l0": 0.5 * _log_front(0.015)},
         {"id": "c", "ce_increase": 0.07, "l0": 0.25 * _log_front(0.07)},
         {"id": "gap", "ce_increase": 0.5, "l0": 1.0},
         {"id": "low", "ce_increase": 0.005, "l0": 1.0},
         {"id": "nan", "ce_increase": 0.02, "l0": "nan"}]
  res = matched.matched_comparison({"local": local, "e2e": e2e})
  assert [p["id"] for p in res["reference_front"]] == ["l0", "l1", "l2", "l3", "l4"]
  by_id = {p["id"]: p for p in res["points"]}
  for vid, ratio in (("a", 0.5), ("b", 0.5), ("c", 0.25)):
    assert by_id[vid]["in_range"] and by_id[vid]["ratio"] == pytest.approx(ratio, rel=1e-12)
    assert by_id[vid]["ratio_interval"] is None and by_id[vid]["n_seeds"] == 1
  assert not by_id["gap"]["in_range"] and by_id["gap"]["ratio"] is None
  assert by_id["gap"]["note"].startswith("not covered")
  assert by_id["low"]["note"].startswith("outside range")
  assert by_id["nan"]["ratio"] is None and by_id["nan"]["note"] == "not finite"
  agg = res["by_type"]["e2e"]
  assert (agg["n"], agg["n_in_range"]) == (5, 3)
  assert agg["median_ratio"] == pytest.approx(0.5) and agg["min_ratio"] == pytest.approx(0.25)
  assert agg["median_ratio_interval"] is None
  text, = matched.matched_sentences(res)
  assert text.startswith("e2e SAEs need a median 0.5× the L0 of local SAEs at the same CE "
                         "increase (3 of 5 points covered: interpolated between local front "
                         "points at most 4× apart in CE increase, never extrapolated; one seed")
  # A wide-enough gap factor covers the gap point too.
  wide = matched.matched_comparison({"local": local, "e2e": e2e}, max_gap_factor=100.0)
  assert wide["by_type"]["e2e"]["n_in_range"] == 4


def test_matched_comparison_without_reference_or_coverage_is_flagged():
  res = matched.matched_comparison({"e2e": [{"id": "a", "ce_increase": 0.1, "l0": 3.0}]})
  assert res["note"] and res["by_type"]["e2e"]["n_in_range"] == 0
  assert res["points"][0]["ratio"] is None
  only = matched.matched_comparison({"local": [{"id": "a", "ce_increase": 0.1, "l0": 3.0}]})
  assert only["by_type"] == {} and "only local" in only["note"]
  assert matched.matched_sentences(only) == [
      "No matched comparison of L0: only local SAEs: nothing to compare."]
  with pytest.raises(ValueError, match="has no 'alive'"):
    matched.matched_comparison({"local": [{"id": "a", "ce_increase": 0.1}]}, y="alive")
  gap = matched.matched_comparison(
      {"local": [{"id": "l0", "ce_increase": 0.001, "l0": 5.0},
                 {"id": "l1", "ce_increase": 4.0, "l0": 0.5}],
       "e2e": [{"id": "e", "ce_increase": 0.1, "l0": 1.0}]})
  text, = matched.matched_sentences(gap)
  assert text.startswith("e2e vs local, L0: no matched comparison (no e2e SAE is covered")
  assert text.endswith("; 0 of 1 points covered).")


def test_matched_comparison_leaves_frozen_points_out():
  local = [{"id": f"l{i}", "frozen": False, "ce_increase": x, "l0": _log_front(x)}
           for i, x in enumerate([0.1, 0.2, 0.3])]
  frozen = {"id": "lf", "frozen": True, "ce_increase": 0.05, "l0": 0.5}  # would dominate
  e2e = [{"id": "e", "frozen": False, "ce_increase": 0.15, "l0": 0.5 * _log_front(0.15)}]
  a = matched.matched_comparison({"local": local + [frozen], "e2e": e2e})
  assert a == matched.matched_comparison({"local": local, "e2e": e2e})
  assert a["by_type"]["e2e"]["median_ratio"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# Seeds.


def _seeded_rows(e2e_l0_by_seed, local_x_by_seed=None):
  """Report rows: four local configurations (λ) on a log-linear front, three seeds each, and one
  e2e configuration with the given L0 per seed at CE increase 0.03."""
  rows = []
  for i, x in enumerate([0.01, 0.02, 0.04, 0.08]):
    for s in range(3):
      sx = local_x_by_seed[i][s] if local_x_by_seed else x
      rows.append({"id": f"l{i}s{s}", "type": "local", "frozen": False, "ce_increase": sx,
                   "l0": _log_front(sx),
                   "hparams": {"loss": "local", "sparsity_coeff": float(i), "seed": s}})
  for s, l0 in enumerate(e2e_l0_by_seed):
    rows.append({"id": f"e{s}", "type": "e2e", "frozen": False, "ce_increase": 0.03, "l0": l0,
                 "hparams": {"loss": "e2e", "sparsity_coeff": 1.0, "seed": s}})
  return rows


def test_seed_configs_group_variants_differing_only_in_seed():
  rows = _seeded_rows([1.0, 2.0, 3.0])
  rows.append({"id": "x", "type": "local", "hparams": {}})
  cfg = matched.seed_configs(rows)
  assert len({cfg[f"l0s{s}"] for s in range(3)}) == 1
  assert cfg["l0s0"] != cfg["l1s0"] and cfg["e0"] == cfg["e2"] != cfg["l0s0"]
  assert cfg["x"] not in set(cfg[r["id"]] for r in rows[:-1])


def test_bootstrap_interval_over_seeds_closed_form():
  # A fixed front (every local seed at the same point) and three e2e seeds: the ratio of a
  # resample is mean(resampled L0) / ref; each extreme (all three draws the smallest / largest
  # seed) has probability 1/27 > 2.5%, so the 95% percentile interval is exactly
  # [min, max] / ref.
  l0 = [3.0, 4.0, 8.0]
  rows = _seeded_rows(l0)
  grouped = comparison.points_by_type(rows, "ce_increase", "l0")
  res = matched.matched_comparison(grouped, configs=matched.seed_configs(rows), n_boot=4000)
  ref = _log_front(0.03)
  p, = res["points"]
  assert p["ids"] == ["e0", "e1", "e2"] and p["n_seeds"] == 3 and res["n_seeds_max"] == 3
  assert [s["y"] for s in p["per_seed"]] == l0
  assert p["ratio"] == pytest.approx(np.mean(l0) / ref, rel=1e-12)
  assert p["boot_covered"] == 1.0
  assert (p["ratio_interval"]["lo"], p["ratio_interval"]["hi"]) == pytest.approx(
      (min(l0) / ref, max(l0) / ref), rel=1e-12)
  agg = res["by_type"]["e2e"]
  assert agg["median_ratio_interval"]["lo"] == pytest.approx(min(l0) / ref, rel=1e-12)
  assert len(res["reference_front"]) == 4 and res["reference_front"][0]["n_seeds"] == 3
  # Deterministic, and the sentence carries the interval.
  again = matched.matched_comparison(grouped, configs=matched.seed_configs(rows), n_boot=4000)
  assert again == res
  text, = matched.matched_sentences(res)
  assert f"a median {np.mean(l0) / ref:.2g}× [{min(l0) / ref:.2g}, {max(l0) / ref:.2g}] the L0" \
      in text and "1 of 1 points covered" in text and "bootstrap over up to 3 seeds" in text
  # Identical seeds: a zero-width interval.
  flat = _seeded_rows([5.0, 5.0, 5.0])
  res = matched.matched_comparison(comparison.points_by_type(flat, "ce_increase", "l0"),
                                   configs=matched.seed_configs(flat))
  iv = res["points"][0]["ratio_interval"]
  assert iv["lo"] == iv["hi"] == pytest.approx(5.0 / ref)


def test_bootstrap_over_seeds_withholds_an_interval_when_coverage_is_unstable():
  # The lowest local configuration (the front's low end) has seeds at CE increase 0.025, 0.03,
  # 0.035 around the e2e point's 0.03: resamples whose seed mean moves above 0.03 leave the
  # point outside the front.
  local_x = [[0.025, 0.03, 0.035], [0.06, 0.06, 0.06], [0.1, 0.1, 0.1], [0.2, 0.2, 0.2]]
  rows = _seeded_rows([3.0, 4.0, 5.0], local_x)
  res = matched.matched_comparison(comparison.points_by_type(rows, "ce_increase", "l0"),
                                   configs=matched.seed_configs(rows))
  p, = res["points"]
  assert p["in_range"] and p["ratio"] is not None  # covered at the seed means (on the front)
  assert 0.3 < p["boot_covered"] < 0.95
  assert p["ratio_interval"] is None and p["note"].startswith("coverage unstable over seeds")
  assert res["by_type"]["e2e"]["median_ratio_interval"] is None
  text, = matched.matched_sentences(res)
  assert "no interval: coverage unstable over 3 seeds" in text


def test_ratio_over_the_points_own_x_interval():
  # Local front L0 = 50 - 100x at x = 0.1 .. 0.4; an e2e point at x = 0.25 with SE 0.01 is
  # resolved (its interval stays between front points), one with SE 0.2 reaches 0.
  local = [{"id": f"l{i}", "ce_increase": x, "l0": 50.0 - 100.0 * x, "se": 0.0}
           for i, x in enumerate([0.1, 0.2, 0.3, 0.4])]
  e2e = [{"id": "a", "ce_increase": 0.25, "l0": 10.0, "se": 0.01},
         {"id": "b", "ce_increase": 0.25, "l0": 10.0, "se": 0.2},
         {"id": "c", "ce_increase": 0.25, "l0": 10.0, "se": "nan"}]
  res = matched.matched_comparison({"local": local, "e2e": e2e}, "ce_increase", "l0",
                                   x_se="se")
  pts = {p["id"]: p for p in res["points"]}
  z = stats.z_value()
  x_lo, x_hi = 0.25 - z * 0.01, 0.25 + z * 0.01
  ref = lambda x: matched.interpolate_front(x, [0.1, 0.2, 0.3, 0.4], [40.0, 30.0, 20.0, 10.0])[0]
  r = pts["a"]["ratio_over_x"]
  assert r["x_lo"] == pytest.approx(x_lo) and r["x_hi"] == pytest.approx(x_hi)
  # L0 falls with x, so the ratio is largest at the interval's high end.
  assert r["hi"] == pytest.approx(10.0 / ref(x_hi)) and r["lo"] == pytest.approx(10.0 / ref(x_lo))
  assert r["lo"] < pts["a"]["ratio"] < r["hi"]
  assert pts["b"]["ratio_over_x"] is None and "reaches 0" in pts["b"]["x_note"]
  assert pts["c"]["x_se"] is None and pts["c"]["ratio_over_x"] is None
  assert res["by_type"]["e2e"]["n_x_resolved"] == 1
  assert "1 of the 3 covered resolved in CE increase" in " ".join(
      matched.matched_sentences(res))

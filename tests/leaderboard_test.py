"""The leaderboard (`report/leaderboard.py`, `experiments/leaderboard.py`): on synthetic reports
with a known order the ranking finds it, overlapping intervals tie, uncovered reference points
say so, readings follow the log-x interpolation, plots are PNGs, and the command runs end to end
on a smoke run's report."""

import json
import math
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from jaxsae.analysis import matched
from jaxsae.report import leaderboard
from jaxsae.report import leaderboard_output
from jaxsae.report import leaderboard_plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "testdata" / "leaderboard_smoke_report.json"
LADDER = (0.01, 0.02, 0.04, 0.08)  # CE increases, each type's λ ladder
SEED_NOISE = (-1.0, 0.0, 1.0)  # per seed, times a type's noise


def _estimate(v, se=0.01):
  return {"value": v, "se": se, "lo": v - 1.96 * se, "hi": v + 1.96 * se, "n": 20}


def _report(types, ladder=LADDER, seeds=3, language="toy"):
  """types: name -> (mcc(x), absorption(x), seed noise); CE increase = the ladder value."""
  variants, ground = [], []
  for t, (mcc, absorption, noise) in types.items():
    for li, x in enumerate(ladder):
      for s in range(seeds):
        vid = f"{t}-{li}-{s}"
        e = SEED_NOISE[s % 3] * noise
        variants.append({"id": vid, "type": t, "frozen": False, "ce_increase": x,
                         "l0": 100 * x, "hparams": {"sparsity_coeff": li, "seed": s}})
        ground.append({"id": vid, "mcc": _estimate(mcc(x) + e),
                       "absorption": _estimate(absorption(x) + e)})
  return {"run": {"language": language}, "variants": variants,
          "ground_truth": {"variants": ground}}


def _toy():
  return _report({
      "best": (lambda x: 0.9 + 0.01 * math.log(x), lambda x: 0.05, 0.002),
      "mid": (lambda x: 0.5, lambda x: 0.3, 0.02),
      "mid2": (lambda x: 0.505, lambda x: 0.31, 0.02)})


@pytest.fixture(scope="module")
def toy_board():
  return leaderboard.language_board(_toy(), n_boot=200)


def test_a_dominant_type_ranks_first_alone_and_overlapping_types_tie(toy_board):
  for axis in leaderboard.AXES:
    for m in ("mcc", "absorption"):
      points = toy_board["axes"][axis]["metrics"][m]["points"]
      assert len(points) == 3
      for p in points:
        by = {r["type"]: r for r in p["ranking"]}
        assert by["best"]["label"] == "1" and by["best"]["rank"] == 1
        assert by["mid"]["rank"] == by["mid2"]["rank"] == 2
        assert by["mid"]["label"] == by["mid2"]["label"] == "2="
        assert by["mid"]["indistinguishable_from"] == ["mid2"]
        assert by["best"]["indistinguishable_from"] == []
        assert p["ranking"][0]["type"] == "best"
        assert leaderboard.ranking_text(p["ranking"]).startswith("1 best; 2= ")


def test_best_lists_the_rank_one_types_and_says_when_none_can_be_ranked(toy_board):
  answer = leaderboard.best(toy_board)
  for axis in leaderboard.AXES:
    for m in ("mcc", "absorption"):
      rows = answer[axis][m]
      assert [r["x"] for r in rows] == toy_board["axes"][axis]["reference_points"]
      for r in rows:
        assert r["best"] == ["best"] and r["covered"] == 3 and r["unranked"] == []
        assert "best (" in leaderboard_output.best_text(rows, axis)
        assert "[of 3 ranked]" in leaderboard_output.best_text(rows, axis)
  # Two types with the same curve tie for first; an uncovered point says so.
  tied = leaderboard.language_board(_report({
      "a": (lambda x: 0.5, lambda x: 0.3, 0.02), "b": (lambda x: 0.5, lambda x: 0.3, 0.02)}),
      n_boot=50)
  rows = leaderboard.best(tied)["ce_increase"]["mcc"]
  assert all(sorted(r["best"]) == ["a", "b"] for r in rows)
  assert leaderboard_output.best_text([{"x": 1.0, "best": [], "value": {}, "covered": 0,
                                 "unranked": []}], "l0") == "L0 1: no type covered"
  assert leaderboard_output.best_text([{"x": 1.0, "best": [], "value": {}, "covered": 2,
                                 "unranked": ["a", "b"]}], "l0") == "L0 1: no interval to rank"


def test_reference_points_are_quartiles_of_the_common_range(toy_board):
  refs = toy_board["axes"]["ce_increase"]["reference_points"]
  # 12 configurations: 3 types × LADDER; the q-quantile sits at position q · 11 of the sorted
  # values (each ladder value three times).
  pooled = sorted(LADDER * 3)
  expect = []
  for q in leaderboard.QUANTILES:
    pos = q * (len(pooled) - 1)
    i = int(pos)
    expect.append(pooled[i] + (pos - i) * (pooled[i + 1] - pooled[i]))
  np.testing.assert_allclose(refs, expect)
  np.testing.assert_allclose(toy_board["axes"]["l0"]["reference_points"],
                             [100 * x for x in expect])


def test_the_reading_is_log_linear_between_neighbours_and_bootstrapped_over_seeds(toy_board):
  # best's MCC is linear in log x with seed noise symmetric about it, so the seed mean at any
  # covered x is 0.9 + 0.01 log x exactly, and its interval brackets it.
  for p in toy_board["axes"]["ce_increase"]["metrics"]["mcc"]["points"]:
    e = p["entries"]["best"]
    assert e["value"] == pytest.approx(0.9 + 0.01 * math.log(p["x"]), abs=1e-12)
    assert e["lo"] <= e["value"] <= e["hi"] and e["hi"] - e["lo"] < 0.01
    assert "bootstrap" in e["method"]


def test_a_type_whose_range_misses_a_reference_point_is_not_covered():
  report = _toy()
  far = _report({"far": (lambda x: 0.99, lambda x: 0.0, 0.0)}, ladder=(1.0, 2.0))
  report["variants"] += far["variants"]
  report["ground_truth"]["variants"] += far["ground_truth"]["variants"]
  board = leaderboard.language_board(report, n_boot=50)
  a = board["axes"]["ce_increase"]
  assert "no range common" in a["how"]
  covered_far = [p["x"] for p in a["metrics"]["mcc"]["points"]
                 if p["entries"]["far"]["covered"]]
  for p in a["metrics"]["mcc"]["points"]:
    e = p["entries"]["far"]
    if p["x"] < 1.0:
      assert not e["covered"] and e["value"] is None
      assert e["note"].startswith(leaderboard.NOT_COVERED)
      assert "far" not in {r["type"] for r in p["ranking"]}
  assert all(x >= 1.0 for x in covered_far)
  norm, text = leaderboard_plots.heatmap_cells(board, leaderboard.METRICS)  # greyed cells
  mid = a["metrics"]["mcc"]["points"][leaderboard.middle_point(board, "ce_increase")]
  i, j = board["types"].index("far"), board["metrics"].index("mcc")
  assert math.isnan(norm[i, j]) == (not mid["entries"]["far"]["covered"])
  assert (text[i][j] == "not\ncovered") == (not mid["entries"]["far"]["covered"])


def test_same_reports_same_board():
  a = leaderboard.leaderboard({"toy": _toy()}, n_boot=100, seed=3)
  b = leaderboard.leaderboard({"toy": _toy()}, n_boot=100, seed=3)
  assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_gaps_wider_than_the_rule_and_the_range_ends_are_not_covered():
  curve = leaderboard.curves(leaderboard.sae_points(
      _report({"t": (lambda x: x, lambda x: 0.0, 0.0)}, ladder=(0.01, 0.08), seeds=1)),
      "ce_increase", "mcc")["t"]
  assert 0.08 / 0.01 > matched.MAX_GAP_FACTOR
  for x in (0.03, 0.005, 0.1):
    out = leaderboard.read_curve(curve, x)
    assert not out["covered"] and out["note"].startswith(leaderboard.NOT_COVERED)
  on = leaderboard.read_curve(curve, 0.08)
  assert on["covered"] and on["value"] == pytest.approx(0.08)


def test_one_seed_interval_interpolates_the_neighbours_own_intervals():
  report = _report({"t": (lambda x: 10 * x, lambda x: 0.0, 0.0)}, ladder=(0.01, 0.04), seeds=1)
  curve = leaderboard.curves(leaderboard.sae_points(report), "ce_increase", "mcc")["t"]
  out = leaderboard.read_curve(curve, 0.02)  # halfway in log x
  assert out["value"] == pytest.approx(0.25)
  half = 1.96 * 0.01
  assert (out["lo"], out["hi"]) == (pytest.approx(0.25 - half), pytest.approx(0.25 + half))
  assert "one seed" in out["method"]


def test_rank_counts_only_entirely_better_intervals():
  def e(v, lo, hi):
    return {"covered": True, "value": v, "lo": lo, "hi": hi}
  # a > c for sure; b overlaps both: ranks 1, 1, 2 (b is not distinguishable from either).
  rows = leaderboard.rank({"a": e(0.9, 0.85, 0.95), "b": e(0.8, 0.6, 0.86),
                           "c": e(0.7, 0.65, 0.75), "d": {"covered": False}}, True)
  assert [(r["type"], r["label"]) for r in rows] == [("a", "1="), ("b", "1="), ("c", "2")]
  flipped = leaderboard.rank({"a": e(0.9, 0.85, 0.95), "c": e(0.7, 0.65, 0.75)}, False)
  assert [(r["type"], r["label"]) for r in flipped] == [("c", "1"), ("a", "2")]
  no_iv = leaderboard.rank({"a": {"covered": True, "value": 1.0, "lo": None, "hi": None}}, True)
  assert no_iv[0]["rank"] is None and no_iv[0]["label"] == "—"


def test_heatmap_normalises_so_the_best_is_one(toy_board):
  norm, text = leaderboard_plots.heatmap_cells(toy_board, leaderboard.METRICS)
  i = toy_board["types"].index("best")
  np.testing.assert_allclose(norm[i], 1.0)  # best MCC and lowest absorption alike
  assert all("#1" in t for t in text[i])


def test_plots_are_deterministic_pngs(toy_board, tmp_path):
  for fn in (leaderboard_plots.plot_pareto, leaderboard_plots.plot_heatmap):
    a = fn(str(tmp_path / "a.png"), toy_board, leaderboard.METRICS, title="toy")
    b = fn(str(tmp_path / "b.png"), toy_board, leaderboard.METRICS, title="toy")
    data = pathlib.Path(a).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data == pathlib.Path(b).read_bytes()
    img = matplotlib.image.imread(a)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_bad_input_fails_clearly():
  with pytest.raises(ValueError, match="report.json dict"):
    leaderboard.sae_points({"run": {}})
  with pytest.raises(ValueError, match="at least one"):
    leaderboard.leaderboard({})
  with pytest.raises(ValueError, match="quantiles"):
    leaderboard.language_board(_toy(), quantiles=(0.5, 2.0), n_boot=10)


def test_the_command_runs_end_to_end_on_a_smoke_report(tmp_path):
  smoke = json.loads(SMOKE.read_text())
  work = []
  for name, rep in (("smoke", smoke), ("toy", _toy())):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "report.json").write_text(json.dumps(rep))
    work.append(str(tmp_path / name))
  out = tmp_path / "board"
  proc = subprocess.run([sys.executable, "-m", "experiments.leaderboard", f"--out={out}",
                         "--n_boot=50", *work], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  board = json.loads((out / "leaderboard.json").read_text())
  lang = smoke["run"]["language"]
  assert list(board["languages"]) == [lang, "toy"]
  b = board["languages"][lang]
  assert set(b["types"]) == set(smoke["run"]["types"])
  assert "causal_fraction" in b["metrics"] and "mcc" in b["metrics"]
  md = (out / "leaderboard.md").read_text()
  assert f"## {lang}" in md and "## toy" in md and leaderboard.NOT_COVERED in md
  assert "## Best per language" in md and "| MCC | CE increase " in md
  assert board["best"]["toy"]["l0"]["mcc"][0]["best"] == ["best"]
  for name in (f"pareto_{lang}", f"heatmap_{lang}", "pareto_toy", "heatmap_toy"):
    assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert f"({name}.png)" in md
  # Every covered reading of the smoke board lies on one of its configurations (a smoke grid
  # has one configuration per type, so nothing can be interpolated) and every other is not
  # covered.
  for a in b["axes"].values():
    for m, per in a["metrics"].items():
      for p in per["points"]:
        for t, e in p["entries"].items():
          xs = [c["x"] for c in per["curves"].get(t, [])]
          assert e["covered"] == (p["x"] in xs), (m, t)
  missing = subprocess.run([sys.executable, "-m", "experiments.leaderboard", f"--out={out}",
                            str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True,
                           check=False)
  assert missing.returncode != 0 and "report.json does not exist" in missing.stderr


def test_a_metric_on_one_configuration_per_type_is_listed_not_read_off_a_curve(tmp_path):
  """Causality tested on one SAE per type: no curve, so neither interpolated nor ranked; each SAE
  is listed at its own cost, best first, with its Wilson interval."""
  rep = _toy()
  tested = {"best-1-0": (3, 24), "mid-3-0": (12, 24), "mid2-0-0": (20, 24)}
  rep["causal"] = {vid: {"fraction_as_predicted": k / n, "n_tested": n,
                         "fraction_as_predicted_interval": [k / n - 0.1, k / n + 0.1]}
                   for vid, (k, n) in tested.items()}
  b = leaderboard.language_board(rep, n_boot=20)
  assert "causal_fraction" not in b["metrics"] and "mcc" in b["metrics"]
  rows = b["measured_once"]["causal_fraction"]
  assert [r["id"] for r in rows] == ["mid2-0-0", "mid-3-0", "best-1-0"]
  by_id = {v["id"]: v for v in rep["variants"]}
  for r in rows:
    k, n = tested[r["id"]]
    assert (r["value"], r["lo"], r["hi"]) == pytest.approx((k / n, k / n - 0.1, k / n + 0.1))
    assert (r["l0"], r["ce_increase"]) == (by_id[r["id"]]["l0"], by_id[r["id"]]["ce_increase"])
  md = "\n".join(leaderboard_output.render(leaderboard.leaderboard({"toy": rep}, n_boot=20)))
  assert "### causal fraction, measured on one configuration per type" in md
  assert "| mid2 | mid2-0-0 | 1 | 0.01 | 0.83 [0.73, 0.93] |" in md
  assert "| causal fraction | measured on one configuration per type" in md
  # A second configuration of one type gives it a curve: back to the matched readings.
  rep["causal"]["best-2-0"] = dict(rep["causal"]["best-1-0"])
  b2 = leaderboard.language_board(rep, n_boot=20)
  assert "causal_fraction" in b2["metrics"] and not b2["measured_once"]

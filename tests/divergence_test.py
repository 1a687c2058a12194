"""Divergence verdicts on loss curves and on the jobs' metrics.jsonl."""

import json
import math

import pytest

from jaxsae.core import divergence


def test_healthy_curves_are_not_flagged():
  assert divergence.check([1, 2, 3], [3.0, 2.0, 1.0]) is None
  assert divergence.check([1, 2], [1.0, 99.0]) is None  # growth below the factor
  assert divergence.check([], []) is None


def test_growth_by_orders_of_magnitude_is_flagged_with_its_ratio():
  v = divergence.check([2, 4, 6], [0.5, 10.0, 0.5 * 1e4])
  assert v["ratio"] == pytest.approx(1e4) and v["first_step"] == 2 and v["last_step"] == 6
  assert "1e+04x (> 100x)" in v["reason"]


@pytest.mark.parametrize("last", ["nan", "inf", float("nan")])
def test_non_finite_last_loss_is_flagged(last):
  v = divergence.check([1, 2], [1.0, last])
  assert v["ratio"] is None and "non-finite loss" in v["reason"]
  json.dumps(v, allow_nan=False)  # strict JSON


def test_baseline_catches_a_blow_up_inside_the_first_interval():
  # First logged value already huge: only the initial loss reveals the growth.
  assert divergence.check([2, 4], [1e9, 1.6e9]) is None
  v = divergence.check([2, 4], [1e9, 1.6e9], baseline=math.log(13))
  assert v["reference"] == pytest.approx(math.log(13))
  assert v["ratio"] == pytest.approx(1.6e9 / math.log(13))


def _write(path, records, torn=""):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.write(torn)


def test_flag_variants_marks_only_the_diverged_one(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  recs = []
  for step, losses in ((2, (0.3, 5e9, 0.2)), (4, (0.2, 1.8e10, 0.1))):
    for vid, loss in zip(("v0", "v1", "v2"), losses):
      recs.append({"step": step, "variant": vid, "loss": loss, "first_step_loss": loss / 2})
  recs[1]["first_step_loss"] = 0.4  # v1's loss before its first update
  _write(str(path), recs, torn='{"step": 6, "variant": "v0", "lo')  # a torn last line
  summary = {"variants": {v: {"group": "g0", "hparams": {"lr": lr}}
                          for v, lr in (("v0", 1e-3), ("v1", 1e6), ("v2", 1e-3))}}
  divergence.flag_variants(summary, path)
  assert list(summary["diverged"]) == ["v1"]
  assert summary["diverged"]["v1"]["hparams"] == {"lr": 1e6}
  assert summary["diverged"]["v1"]["ratio"] == pytest.approx(1.8e10 / 0.4)
  assert summary["variants"]["v0"]["divergence"] is None
  assert summary["variants"]["v2"]["divergence"] is None


def test_flag_run_uses_train_records_and_the_uniform_ce(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, [{"kind": "train", "step": 2, "loss": 168.0},
                {"kind": "eval", "step": 2, "eval_ce": 1e12},
                {"kind": "train", "step": 4, "loss": 2008.0}])
  summary = {}
  divergence.flag_run(summary, path, vocab_size=13)
  assert summary["divergence"]["ratio"] == pytest.approx(2008.0 / math.log(13))
  _write(path, [{"kind": "train", "step": 2, "loss": 2.6}, {"kind": "train", "step": 4,
                                                             "loss": 1.0}])
  divergence.flag_run(summary, path, vocab_size=13)
  assert summary["divergence"] is None

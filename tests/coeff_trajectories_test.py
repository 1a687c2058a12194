"""L0 during training across a sparsity-coefficient sweep: families, spread, penalty share."""

import pytest

from jaxsae.report import coeff_trajectories
from jaxsae.report import markdown
from jaxsae.report import menon


def _row(vid, alpha, expansion=1, t="local", frozen=False, seed=0):
  return {"id": vid, "type": t, "frozen": frozen,
          "hparams": {"sparsity_coeff": alpha, "expansion": expansion, "seed": seed},
          "grammaticality_by_combo": {"original/sentence": {"mean": 0.1}}}


def _records(vid, alpha, l0, steps=range(50, 1001, 50), mse=2.0, sparsity=10.0):
  return [{"step": s, "variant": vid, "l0": l0(s), "sparsity": sparsity,
           "loss": mse + alpha * sparsity} for s in steps]


def test_identical_trajectories_have_zero_spread_and_the_penalty_share_is_exact():
  alphas = [1e-3, 1e-1, 10.0]
  rows = [_row(f"v{i}", a) for i, a in enumerate(alphas)]
  recs = [r for i, a in enumerate(alphas) for r in _records(f"v{i}", a, lambda s: 100 - s / 20)]
  (fam,) = coeff_trajectories.families(rows, recs)
  assert fam["coeffs"] == alphas and fam["variants"] == ["v0", "v1", "v2"]
  assert fam["steps"] == [50, 100, 200, 400, 1000]  # fractions 0, .1, .2, .4, 1 of step 1000
  assert fam["values"][-1] == [50.0, 50.0, 50.0]
  assert fam["max_spread"] == 0.0 and all(s == 0.0 for s in fam["spread"])
  assert fam["first_step"] == 50
  assert fam["penalty_share_first_step"] == pytest.approx([a * 10 / (2 + a * 10) for a in alphas])


def test_spread_is_max_minus_min_over_max():
  alphas = [1.0, 2.0, 4.0]
  rows = [_row(f"v{i}", a) for i, a in enumerate(alphas)]
  recs = [r for i, a in enumerate(alphas)
          for r in _records(f"v{i}", a, lambda s, a=a: 8.0 / a)]  # L0 8, 4, 2
  (fam,) = coeff_trajectories.families(rows, recs)
  assert fam["spread"] == pytest.approx([0.75] * len(fam["steps"]))
  assert fam["max_spread"] == pytest.approx(0.75)


def test_steps_are_the_logged_ones_at_or_before_each_fraction():
  rows = [_row(f"v{i}", a) for i, a in enumerate([1.0, 2.0, 3.0])]
  steps = [7, 30, 61, 99]
  recs = [r for i in range(3) for r in _records(f"v{i}", 1.0, lambda s: 1.0, steps=steps)]
  # v2 misses step 61: only steps every member logged count.
  recs = [r for r in recs if not (r["variant"] == "v2" and r["step"] == 61)]
  (fam,) = coeff_trajectories.families(rows, recs, fractions=(0.0, 0.5, 1.0))
  assert fam["steps"] == [7, 30, 99]


def test_families_split_by_the_other_hparams_and_skip_what_is_not_a_sweep():
  rows = ([_row(f"a{i}", a) for i, a in enumerate([1, 2, 3])]            # a sweep at ×1
          + [_row(f"b{i}", a, expansion=2) for i, a in enumerate([1, 2, 3])]  # another at ×2
          + [_row(f"c{i}", a, expansion=4) for i, a in enumerate([1, 2])]    # two α: too few
          + [_row(f"d{i}", 0.0, expansion=8) for i in range(3)]              # TopK: α 0
          + [_row("e0", 1, 16), _row("e1", 2, 16), _row("e2", 3, 16, frozen=True)]
          + [_row(f"f{i}", a, expansion=32) for i, a in enumerate([1, 1, 2, 3])])  # duplicate α
  recs = [r for row in rows for r in _records(row["id"], row["hparams"]["sparsity_coeff"],
                                                  lambda s: 1.0)]
  fams = coeff_trajectories.families(rows, recs)
  assert [(f["expansion"], f["variants"]) for f in fams] == [
      (1, ["a0", "a1", "a2"]), (2, ["b0", "b1", "b2"])]
  assert coeff_trajectories.families(rows, []) == []  # no records, no family


def test_menon_section_carries_and_renders_the_trajectories():
  alphas = [1e-3, 1.0, 100.0]
  rows = [_row(f"v{i}", a) for i, a in enumerate(alphas)]
  recs = [r for i, a in enumerate(alphas) for r in _records(f"v{i}", a, lambda s: 5.0)]
  with_recs = menon.section(rows, 640, "dyck2", recs)
  assert len(with_recs["coeff_trajectories"]) == 1
  assert menon.section(rows, 640, "dyck2")["coeff_trajectories"] == []
  text = "\n".join(menon.render(with_recs, markdown.md_table))
  assert "### The sparsity coefficient during training" in text
  assert "largest spread 0.000 over α 0.001–100" in text
  assert "| 1000 | 5 | 5 | 5 | 0.000 |" in text


def test_by_type_pools_seeds_with_mean_and_se_and_renders():
  rows, recs = [], []
  for seed, (l0_min, l0_max) in enumerate([(8.0, 2.0), (10.0, 4.0)]):
    for i, a in enumerate([0.5, 2.0, 8.0]):
      vid = f"s{seed}a{i}"
      rows.append(_row(vid, a, seed=seed))
      l0 = {0: l0_min, 1: (l0_min + l0_max) / 2, 2: l0_max}[i]
      recs += _records(vid, a, lambda s, l0=l0: l0)
  (r,) = coeff_trajectories.by_type(coeff_trajectories.families(rows, recs))
  assert (r["type"], r["expansion"], r["seeds"], r["coeffs"]) == ("local", 1, 2, [0.5, 2.0, 8.0])
  assert r["l0_at_min"] == pytest.approx(9.0) and r["l0_at_min_se"] == pytest.approx(1.0)
  assert r["l0_at_max"] == pytest.approx(3.0) and r["l0_at_max_se"] == pytest.approx(1.0)
  # spreads (8 − 2) / 8 = 0.75 and (10 − 4) / 10 = 0.6
  assert r["final_spread"] == pytest.approx(0.675) and r["final_spread_se"] == pytest.approx(0.075)
  text = "\n".join(coeff_trajectories.render_by_type([r], markdown.md_table))
  assert "| local | 1 | 2 | 0.5–8 (3) | 9 ± 1 | 3 ± 1 | 0.675 ± 0.075 |" in text
  assert coeff_trajectories.render_by_type([], markdown.md_table) == []

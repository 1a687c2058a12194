"""The report's Menon section: pooled cells with Wilson intervals, and the paper's claims."""

import itertools

import pytest

from jaxsae.core import stats
from jaxsae.report import markdown
from jaxsae.report import menon


def _row(vid, t, hp, original, corrected=None, frozen=False):
  combos = {"original/sentence": {"mean": original}}
  if corrected is not None:
    combos["corrected/sentence"] = {"mean": corrected}
  return {"id": vid, "type": t, "hparams": hp, "frozen": frozen,
          "grammaticality_by_combo": combos}


def _topk_rows(value, t="topk", corrected=None):
  rows = []
  for i, (k, e) in enumerate(itertools.product([8, 32, 128], [1, 2, 8])):
    v = value(k, e)
    rows.append(_row(f"{t}{i}", t, {"k": k, "expansion": e}, v,
                     corrected(k, e) if corrected else v))
  return rows


def test_cells_pool_their_saes_with_a_wilson_interval():
  n = 640
  rows = [_row("a", "topk", {"k": 8, "expansion": 1}, 0.5),
          _row("b", "topk", {"k": 8, "expansion": 1}, 0.25),  # a second seed in the same cell
          _row("c", "topk", {"k": 16, "expansion": 1}, 1.0),
          _row("d", "topk", {"k": 16, "expansion": 2}, 0.0, frozen=True)]  # frozen: left out
  m = menon.section(rows, n, "english")
  (g,) = m["tables"]["original"].values()
  assert g["rows"] == [8, 16] and g["cols"] == [1]
  cell = g["cells"][0][0]
  assert cell["n"] == 2 * n and cell["saes"] == 2 and cell["mean"] == pytest.approx(0.375)
  assert [cell["lo"], cell["hi"]] == pytest.approx(list(stats.wilson_interval(480, 1280)))
  assert m["modes"] == ["original"]


def test_no_section_without_the_original_mode_or_a_generation_count():
  rows = [{"id": "a", "type": "topk", "hparams": {"k": 8, "expansion": 1},
           "grammaticality_by_combo": {"corrected/sentence": {"mean": 0.5}}}]
  assert menon.section(rows, 640, "dyck2") is None
  assert menon.section(_topk_rows(lambda k, e: 0.5), None, "dyck2") is None


def test_dyck2_topk_rises_with_k_and_width_and_reports_the_corners():
  rows = _topk_rows(lambda k, e: min(0.05 + 0.1 * (k / 8) ** 0.5 + 0.05 * e, 0.95))
  m = menon.section(rows, 640, "dyck2")
  (claim,) = [c for c in m["claims"] if c["type"] == "topk"]
  res = claim["original"]
  assert res["agrees"] is True and res["spearman_log_k"] > 0.8 and res["spearman_width"] > 0.3
  assert len(res["lowest_k"]) == 3 and res["highest_corner"][0]["mean"] == pytest.approx(0.85)
  falls = menon.section(_topk_rows(lambda k, e: 1 - k / 200), 640, "dyck2")
  assert falls["claims"][0]["original"]["agrees"] is False


def test_zero_claims_hold_only_when_every_interval_is_below_the_bound():
  recon = "topk+input_recon_norm"
  zero = _topk_rows(lambda k, e: 0.0, t=recon, corrected=lambda k, e: 0.97)
  m = menon.section(zero, 640, "english")
  (claim,) = [c for c in m["claims"] if c["type"] == recon]
  assert claim["original"]["agrees"] is True and claim["corrected"]["agrees"] is False
  # One cell at 0.1 exactly: its interval straddles the bound, so the claim is undecided.
  straddle = _topk_rows(lambda k, e: 0.1 if (k, e) == (8, 1) else 0.0, t=recon)
  (claim,) = menon.section(straddle, 640, "english")["claims"]
  assert claim["original"]["agrees"] is None


def test_expr_l1_claim_splits_at_alpha_1e_2():
  rows = [_row(f"l{i}", "local", {"sparsity_coeff": a, "expansion": e},
               1.0 if a <= 1e-2 else 0.0)
          for i, (a, e) in enumerate(itertools.product([1e-3, 1e-2, 1e-1, 1.0], [1, 4]))]
  (claim,) = menon.section(rows, 640, "expr_prefix")["claims"]
  assert claim["kind"] == "expr_l1" and claim["original"]["agrees"] is True
  # The English claim for the same SAEs is "≈ 0 everywhere": it fails.
  (claim,) = menon.section(rows, 640, "english")["claims"]
  assert claim["kind"] == "zero" and claim["original"]["agrees"] is False
  # Only α ≤ 1e-2 (the `menon_l1` study): the half above has no cells, so no verdict.
  low = [r for r in rows if r["hparams"]["sparsity_coeff"] <= 1e-2]
  (claim,) = menon.section(low, 640, "expr_prefix")["claims"]
  assert claim["original"]["agrees"] is None
  assert claim["original"]["ours"] == "α ≤ 1e-2: 1–1; above: no cells"


def test_render_shows_the_claims_and_both_modes():
  rows = _topk_rows(lambda k, e: 634 / 640, corrected=lambda k, e: 627 / 640)
  text = "\n".join(menon.render(menon.section(rows, 640, "english"), markdown.md_table))
  assert "ours, original" in text and "ours, corrected" in text and "**agrees**" in text
  assert "topk, `corrected`" in text and "0.991 [0.980, 0.996]" in text
  assert menon.render(None, markdown.md_table) == []

"""Report plots: each writes a valid PNG of its figure's size (creating the directory), with NaN,
"nan"-string and frozen points mixed in; heatmap rows against an argsort reference; colours fixed
per SAE type whatever the input order; and clear errors for mismatched inputs."""

import os
import struct

import numpy as np
import pytest

from jaxsae.report import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
  return struct.unpack(">II", head[16:24])


def _points():
  rng = np.random.default_rng(0)
  pts = {t: [{"id": f"{t}{i}", "l0": float(v), "ce_increase": float(c)}
             for i, (v, c) in enumerate(zip(rng.uniform(1, 100, 6), rng.uniform(0, 1, 6)))]
         for t in ("local", "e2e", "topk")}
  pts["local"][0]["ce_increase"] = "nan"  # never drawn
  pts["e2e"][1]["l0"] = float("inf")
  pts["topk"][2]["frozen"] = True  # drawn as a cross, off the front
  return pts


def test_tradeoff_plots_write_pngs_of_their_figure_size(tmp_path):
  pts = _points()
  path = str(tmp_path / "new" / "dir" / "l0_vs_ce.png")
  assert plots.plot_l0_vs_ce(path, pts) == path
  assert _png_size(path) == (640, 440)  # 6.4 × 4.4 inches at 100 dpi
  gram = {t: [dict(p, grammaticality=p["ce_increase"]) for p in ps] for t, ps in pts.items()}
  path = plots.plot_l0_vs_grammaticality(str(tmp_path / "g.png"), gram, clean="0.9")
  assert _png_size(path) == (640, 440)
  empty = plots.plot_tradeoff(str(tmp_path / "e.png"), {}, "l0", "kl")
  assert os.path.getsize(empty) > 0


def test_grid_and_feature_recovery_plots(tmp_path):
  grid = {"values": [[0.5, np.nan], [0.7, 0.9]], "rows": [1.0, 4.0], "cols": [2, 4],
          "row_field": "sparsity_coeff", "col_field": "expansion"}
  path = plots.plot_grids(str(tmp_path / "grid.png"), {"local": grid, "topk": grid},
                                 "title", vmin=0.0, vmax=1.0)
  assert _png_size(path) == (720, 340)  # two panels of 3.6 × 3.4 inches
  recovery = {t: {"mean_best_abs_corr": {"depth": 0.9, "open": np.nan},
                  "mean_matching_score": 0.5} for t in ("local", "e2e")}
  w, h = _png_size(plots.plot_feature_recovery(str(tmp_path / "fr.png"), recovery))
  assert w >= 500 and h == 400


def test_correlation_heatmap_rows_and_errors(tmp_path):
  rng = np.random.default_rng(1)
  corr = rng.uniform(-1, 1, (20, 3))
  corr[4] = np.nan  # NaN counts as 0: never among the top rows here
  corr[7, 2] = -0.999  # the strongest, by absolute value
  rows = plots.top_latents(corr, top=5)
  ref = np.argsort(-np.abs(np.nan_to_num(corr)).max(axis=1), kind="stable")[:5]
  np.testing.assert_array_equal(rows, ref)
  assert rows[0] == 7 and 4 not in rows
  path = plots.plot_correlation(str(tmp_path / "c.png"), corr, ["a", "b", "c"], top=5)
  _png_size(path)
  with pytest.raises(ValueError, match="3 label names"):
    plots.plot_correlation(str(tmp_path / "x.png"), corr[:, :2], ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"must be \[F, K\]"):
    plots.top_latents(np.zeros(4))


def test_colours_are_fixed_per_type():
  a = plots._colours(["topk", "local", "e2e"])  # pylint: disable=protected-access
  b = plots._colours(["e2e", "topk", "local"])  # pylint: disable=protected-access
  assert a == b and len(set(a.values())) == 3


def test_ce_increase_axes_are_symlog(tmp_path, monkeypatch):
  figures = []
  original = plots.save
  monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or
                      original(fig, path))
  pts = _points()
  pts["e2e"][0]["ce_increase"] = -2e-4  # slightly negative: drawn, on the linear part
  pts["local"][1]["ce_increase"] = 1e-4
  plots.plot_l0_vs_ce(str(tmp_path / "a.png"), pts)
  plots.plot_alive_vs_ce(str(tmp_path / "b.png"),
                                {t: [dict(p, alive=p["l0"]) for p in ps] for t, ps in pts.items()})
  plots.plot_l0_vs_grammaticality(
      str(tmp_path / "c.png"), {t: [dict(p, grammaticality=0.5) for p in ps]
                                for t, ps in pts.items()})
  axes = [fig.axes[0] for fig in figures]
  for ax in axes[:2]:
    assert ax.get_yscale() == "symlog"
    assert ax.yaxis.get_transform().linthresh == plots.CE_LINTHRESH
    assert ax.get_ylim()[0] < -2e-4  # the negative CE increase is inside the view
  # x (L0 / alive, 1..100 here) stays logarithmic; grammaticality keeps a linear y axis.
  assert axes[0].get_xscale() == "log" and axes[1].get_xscale() == "log"
  assert axes[2].get_yscale() == "linear"
  # CE increases within one decade (no decade tick in view): a linear axis, with its labels.
  narrow = {"local": [{"id": "a", "l0": 1.0, "ce_increase": 0.15},
                      {"id": "b", "l0": 90.0, "ce_increase": 0.17}]}
  plots.plot_l0_vs_ce(str(tmp_path / "n.png"), narrow)
  assert figures[-1].axes[0].get_yscale() == "linear"
  with pytest.raises(ValueError, match="yscale"):
    plots.plot_tradeoff(str(tmp_path / "d.png"), pts, "l0", "ce_increase", yscale="logit")

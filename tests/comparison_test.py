"""Comparison: SAE types of every kind, points grouped by type, Menon grids, feature recovery
and the causal summary per type against NumPy references (Pareto fronts and the matched
comparison: matched_test.py)."""

import itertools
import re

import numpy as np
import pytest

import fakes
from jaxsae.analysis import comparison
from jaxsae.core import stats
from jaxsae.grid import sae_groups
from jaxsae.grid import sweep as sweep_lib


def _hparams(**fields):
  """Every sweep field (registry defaults) with `fields` set, JSON-ified as summary.json has it."""
  variant, = sweep_lib.expand([{"set": fields}], sae_groups.registry())
  return {k: sweep_lib.to_json(v) for k, v in variant.values.items()}


# ------------------------------------------------------------------------------------------------
# SAE types.


@pytest.mark.parametrize("fields, expected", [
    ({"loss": "local", "activation": "relu"}, "local"),
    ({"loss": "e2e", "activation": "relu"}, "e2e"),
    ({"loss": "e2e_ds", "activation": "relu"}, "e2e_ds"),
    ({"loss": "local", "activation": "topk", "k": 4}, "topk"),
    ({"loss": "local", "activation": "batchtopk", "k": 4}, "batchtopk"),
    ({"loss": "local", "activation": "jumprelu"}, "jumprelu"),
    ({"loss": "local", "activation": "sparsemax_no_kds"}, "sparsemax_no_kds"),
    ({"loss": "local", "activation": "sparsemax_recon_dist"}, "sparsemax_recon_dist"),
    ({"loss": "local", "activation": "sparsemax_dist"}, "sparsemax_dist"),
    ({"loss": "e2e", "activation": "topk", "k": 4}, "e2e_topk"),
    ({"loss": "local", "activation": "relu", "causal": True, "causal_coeff": 1.0},
     "causal-local"),
    ({"loss": "e2e", "activation": "relu", "causal": True}, "causal-e2e"),
    ({"loss": "local", "activation": "topk", "k": 4, "causal": True}, "causal-topk"),
    ({"loss": "local", "activation": "gated"}, "gated"),
    ({"loss": "e2e", "activation": "gated"}, "e2e_gated"),
    ({"loss": "local", "activation": "topk", "k": 4, "auxk": True}, "topk+auxk"),
    ({"loss": "local", "activation": "batchtopk", "k": 4, "matryoshka": (0.25, 0.5)},
     "matryoshka_batchtopk"),
    ({"loss": "e2e", "activation": "relu", "matryoshka": (0.5,)}, "matryoshka_e2e"),
    ({"loss": "local", "activation": "relu", "p_anneal": True}, "local+panneal"),
    ({"loss": "e2e", "activation": "relu", "p_anneal": True, "causal": True},
     "causal-e2e+panneal"),
    ({"loss": "local", "activation": "batchtopk", "k": 4, "matryoshka": (0.5,), "auxk": True,
      "p_anneal": True}, "matryoshka_batchtopk+auxk+panneal"),
    ({"loss": "local", "activation": "relu", "resample_steps": (100,)}, "local+resample"),
    ({"loss": "e2e", "activation": "topk", "k": 4, "auxk": True, "p_anneal": True,
      "resample_steps": [5, 10]}, "e2e_topk+auxk+panneal+resample"),
    ({"loss": "local", "activation": "topk", "k": 8, "input_norm": True, "recon_norm": True},
     "topk+input_recon_norm"),
    ({"loss": "local", "activation": "relu", "input_norm": True}, "local+input_norm"),
    ({"loss": "local", "activation": "relu", "recon_norm": True, "causal": True},
     "causal-local+recon_norm"),
])
def test_sae_type_of_each_kind(fields, expected):
  assert comparison.sae_type(_hparams(**fields)) == expected


def test_sae_type_rejects_unknown():
  with pytest.raises(ValueError, match="activation"):
    comparison.sae_type({"loss": "local", "activation": "gelu"})
  with pytest.raises(ValueError, match="loss"):
    comparison.sae_type({"loss": "mystery"})
  with pytest.raises(ValueError, match="dict"):
    comparison.sae_type(["relu"])


# ------------------------------------------------------------------------------------------------
# Menon grids and feature recovery.


def test_grid_table_places_each_variant_in_its_cell():
  rng = np.random.default_rng(0)
  rows, truth = [], {}
  for k, e in itertools.product([8, 16, 32], [1, 2, 4, 8]):
    v = float(rng.random())
    truth[(k, e)] = v
    rows.append({"hparams": {"k": k, "expansion": e}, "ev": v})
  rows.append({"hparams": {"k": 8, "expansion": 1}, "ev": "nan"})  # a NaN duplicate: ignored
  rows.append({"hparams": {"k": 16, "expansion": 2}, "ev": 1.0})  # a duplicate: averaged
  g = comparison.grid_table(rows[::-1], "ev", row_field="k")
  assert g["rows"] == [8, 16, 32] and g["cols"] == [1, 2, 4, 8]
  for (i, k), (j, e) in itertools.product(enumerate(g["rows"]), enumerate(g["cols"])):
    want = (truth[(k, e)] + 1.0) / 2 if (k, e) == (16, 2) else truth[(k, e)]
    assert g["values"][i][j] == pytest.approx(want)
  assert g["counts"][0][0] == 2
  assert comparison.grid_table(rows[:1], "ev", row_field="k") is None  # one cell: not a grid


@pytest.mark.parametrize("t, field", [("topk", "k"), ("causal-topk", "k"), ("e2e_topk", "k"),
                                      ("topk+input_recon_norm", "k"), ("batchtopk+auxk", "k"),
                                      ("local", "sparsity_coeff"), ("sparsemax_dist", None),
                                      ("local+input_norm", "sparsity_coeff")])
def test_grid_rows_follow_the_base_type_whatever_its_markers(t, field):
  assert comparison.grid_row_field(t) == field


_features = fakes.feature_summaries


def test_feature_recovery_per_type():
  rng = np.random.default_rng(1)
  names = ["depth", "open", "type=a"]
  feats = _features(["v0", "v1", "v2"], names, rng)
  feats["variants"]["v1"]["labels"]["open"]["corr"] = -0.9  # strong, negative
  feats["variants"]["v1"]["matching_score"] = 2.0  # the best local SAE
  rec = comparison.feature_recovery(feats, {"v0": "local", "v1": "local", "v2": "e2e"})
  assert rec["local"]["best_variant"] == "v1" and rec["e2e"]["best_variant"] == "v2"
  best = feats["variants"]["v1"]["labels"]
  assert rec["local"]["labels_ge_0.8"] == [n for n in names if abs(best[n]["corr"]) >= 0.8]
  assert "open" in rec["local"]["labels_ge_0.8"]
  for n in names:
    want = np.mean([abs(feats["variants"][v]["labels"][n]["corr"]) for v in ("v0", "v1")])
    assert rec["local"]["mean_best_abs_corr"][n] == pytest.approx(want)
  with pytest.raises(ValueError, match="not in the run"):
    comparison.feature_recovery(feats, {"v0": "local"})



# ------------------------------------------------------------------------------------------------
# Points by type, and frozen variants.


def _line_l0(x):
  return 50.0 - 100.0 * x  # a local front: (0.1, 40), (0.2, 30), (0.3, 20), (0.4, 10)


def _rows():
  """Report rows of three types, one frozen SAE among the local ones, a NaN string."""
  rows = [{"id": f"l{i}", "type": "local", "frozen": False, "ce_increase": x,
           "l0": _line_l0(x), "alive": 10.0 * i} for i, x in enumerate([0.1, 0.2, 0.3, 0.4])]
  rows.append({"id": "lf", "type": "local", "frozen": True, "ce_increase": 0.05, "l0": 0.5,
               "alive": 1.0})  # would dominate the whole front
  rows.append({"id": "e", "type": "e2e", "frozen": False, "ce_increase": 0.25,
               "l0": 0.5 * _line_l0(0.25), "alive": "nan"})
  rows.append({"id": "tf", "type": "topk", "frozen": True, "ce_increase": 0.3, "l0": 1.0,
               "alive": 1.0})  # the only topk SAE
  return rows


def test_points_by_type_groups_and_drops_frozen():
  rows = _rows()
  got = comparison.points_by_type(rows, "ce_increase", "l0")
  assert list(got) == ["local", "e2e"]  # topk's only SAE is frozen
  assert [p["id"] for p in got["local"]] == ["l0", "l1", "l2", "l3"]
  for p in got["local"] + got["e2e"]:
    row = next(r for r in rows if r["id"] == p["id"])
    assert p == {"id": row["id"], "frozen": False, "ce_increase": row["ce_increase"],
                 "l0": row["l0"]}
  every = comparison.points_by_type(rows, "alive", include_frozen=True)
  assert sum(len(v) for v in every.values()) == len(rows)
  assert every["topk"] == [{"id": "tf", "frozen": True, "alive": 1.0}]
  assert every["e2e"][0]["alive"] == "nan"  # values as given
  # Without a `type`, the type comes from the sweep fields.
  typed = comparison.points_by_type(
      [{"id": "a", "hparams": _hparams(loss="e2e", activation="topk", k=4), "l0": 1.0}], "l0")
  assert list(typed) == ["e2e_topk"]


def test_points_by_type_rejects_bad_rows():
  with pytest.raises(ValueError, match="list of variant dicts"):
    comparison.points_by_type({"v0": {"type": "local"}}, "l0")
  with pytest.raises(ValueError, match=r"'l1' has no \['nmse'\]"):
    comparison.points_by_type([{"id": "l0", "type": "local", "nmse": 0.1},
                               {"id": "l1", "type": "local", "l0": 1.0}], "nmse")
  with pytest.raises(ValueError, match="at least one metric"):
    comparison.points_by_type(_rows())


# ------------------------------------------------------------------------------------------------
# The causal summary per type.


def _causal_run(rng, with_nmse=True):
  """Rows of local / topk / causal-topk SAEs (one frozen, NaN metrics mixed in) and causal
  results for some of them (one without tested pairs, one for an id not in the run)."""
  rows, causal = [], {}
  for t, n in (("local", 3), ("topk", 4), ("causal-topk", 5)):
    for i in range(n):
      vid = f"{t}{i}"
      rows.append({"id": vid, "type": t, "frozen": t == "topk" and i == 3,
                   "nmse": float(rng.uniform(0, 0.2)) if with_nmse else None,
                   "ev_token_mean": float(rng.uniform(0.5, 1)),
                   "ce_increase": float(rng.uniform(-1e-3, 0.1)),
                   "grammaticality": float(rng.uniform(0.5, 1))})
      if t != "local" and i != 1:
        n_tested = int(rng.integers(1, 9))
        pairs = [{"signed_effect": float(rng.normal())} for _ in range(n_tested)]
        causal[vid] = {"fraction_as_predicted": float(rng.random()),
                       "mean_effect": float(rng.normal()), "n_tested": n_tested,
                       "n_as_predicted": int(rng.integers(0, n_tested + 1)), "pairs": pairs,
                       "n_null_too_small": int(rng.integers(0, 5))}
  rows[4]["ce_increase"] = "nan"  # topk1: not in the median
  causal["topk2"]["fraction_as_predicted"] = None  # no tested pairs: not in the mean
  causal["ghost"] = {"fraction_as_predicted": 1.0, "mean_effect": 9.0}
  return rows, causal


def test_causal_by_type_against_numpy():
  rows, causal = _causal_run(np.random.default_rng(4))
  got = comparison.causal_by_type(causal, rows)
  assert list(got) == ["topk", "causal-topk"]  # local: no causal results; ghost: not in the run
  for t, v in got.items():
    ids = sorted(i for i in causal if i.startswith(t))
    assert v["ids"] == ids and v["n_saes"] == len(ids)
    fr = [causal[i]["fraction_as_predicted"] for i in ids]
    want = np.mean([f for f in fr if f is not None])
    assert v["fraction_as_predicted"] == pytest.approx(want)
    assert v["mean_effect"] == pytest.approx(np.mean([causal[i]["mean_effect"] for i in ids]))
    live = [r for r in rows if r["type"] == t and not r["frozen"]]
    assert v["n_variants"] == len(live)
    for m in ("nmse", "ev_token_mean", "ce_increase", "grammaticality"):
      vals = np.array([float(r[m]) for r in live])
      assert v[m] == pytest.approx(np.median(vals[np.isfinite(vals)])), (t, m)
  assert got["topk"]["n_variants"] == 3
  # Pooled over the tested pairs: the counts' Wilson interval, the effects' mean ± SE.
  for t, v in got.items():
    ids = v["ids"]
    k, n = (sum(causal[i][key] for i in ids) for key in ("n_as_predicted", "n_tested"))
    assert (v["n_pairs_as_predicted"], v["n_pairs"]) == (k, n)
    assert v["n_null_too_small"] == sum(causal[i]["n_null_too_small"] for i in ids)
    lo, hi = stats.wilson_interval(k, n)
    assert v["pooled_fraction"]["value"] == pytest.approx(k / n)
    assert (v["pooled_fraction"]["lo"], v["pooled_fraction"]["hi"]) == pytest.approx((lo, hi))
    effects = [p["signed_effect"] for i in ids for p in causal[i]["pairs"]]
    assert v["pooled_mean_effect"]["value"] == pytest.approx(np.mean(effects))
    assert v["pooled_mean_effect"]["se"] == pytest.approx(
        np.std(effects, ddof=1) / np.sqrt(len(effects)))


@pytest.mark.parametrize("with_nmse", [True, False])
def test_causal_sentences_carry_the_numbers(with_nmse):
  rows, causal = _causal_run(np.random.default_rng(5), with_nmse)
  by_type = comparison.causal_by_type(causal, rows)
  text, = comparison.causal_sentences(by_type)
  fid, fid_name = ("nmse", "NMSE") if with_nmse else ("ev_token_mean", "explained variance")
  m = re.fullmatch(r"causal-topk SAEs: (\S+) of tested pairs act as predicted \(pooled \S+ "
                   r"\[\S+, \S+\] of \d+ pairs\) vs (\S+) \(pooled \S+ \[\S+, \S+\] of \d+ "
                   r"pairs\) for topk; median CE increase (\S+) vs (\S+), " + fid_name +
                   r" (\S+) vs (\S+), "
                   r"spliced grammaticality (\S+) vs (\S+)\.", text)
  assert m, text
  c, b = by_type["causal-topk"], by_type["topk"]
  want = [c["fraction_as_predicted"], b["fraction_as_predicted"], c["ce_increase"],
          b["ce_increase"], c[fid], b[fid], c["grammaticality"], b["grammaticality"]]
  for got, w in zip(m.groups(), want):
    assert float(got) == pytest.approx(w, rel=5e-3, abs=5e-7)
  # Without the base type's causal results there is nothing to compare.
  assert comparison.causal_sentences({"causal-topk": c}) == []
  with pytest.raises(ValueError, match="causal must map"):
    comparison.causal_by_type([causal], rows)

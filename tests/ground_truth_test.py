"""Ground-truth feature metrics: planted dictionaries, the derived chance level of MCC, planted
absorption / hedging / splitting with exact counts, closed-form probes and shrinkage, grammar
hierarchies on real labels, and the summary on the codes of a trained smoke grid."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import fakes
from jaxsae import grammars
from jaxsae.analysis import firing
from jaxsae.analysis import ground_truth as gt
from jaxsae.analysis import hierarchy as hierarchy_lib
from jaxsae.analysis import recovery
from jaxsae.analysis import sparse_probing
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import model as model_lib

BIN = grammars.LabelInfo("binary")


def _binary_lm(columns, undefined=None):
  """A LabelMatrix of 0/1 columns {name: [M]} (−1 where `undefined[name]`)."""
  labels = {}
  for name, y in columns.items():
    y = np.asarray(y, np.int64)
    if undefined is not None and name in undefined:
      y = np.where(undefined[name], -1, y)
    labels[name] = y
  return recovery.label_matrix(labels, {n: BIN for n in labels})


def _planted(rng, m=400, k=5, extra=4):
  """K random binary features (some tokens undefined) and codes whose latents perm[j] equal
  scale_j · feature j, plus `extra` dead latents."""
  y = (rng.random((m, k)) < rng.uniform(0.1, 0.5, k)).astype(np.int64)
  undefined = {f"f{j}": rng.random(m) < 0.1 for j in range(k)}
  lm = _binary_lm({f"f{j}": y[:, j] for j in range(k)}, undefined)
  perm = rng.permutation(k + extra)[:k]
  codes = np.zeros((m, k + extra), np.float32)
  for j in range(k):
    codes[:, perm[j]] = rng.uniform(0.5, 3.0) * lm.values[:, j]
  return lm, codes, perm


def test_planted_dictionary_has_mcc_one_and_f1_one():
  lm, codes, perm = _planted(np.random.default_rng(0))
  mr = gt.matched_recovery(codes, lm)
  np.testing.assert_array_equal(mr.latent_K, perm)
  assert mr.mcc == pytest.approx(1.0, abs=1e-5)
  for a in (mr.abs_corr_K, mr.precision_K, mr.recall_K, mr.f1_K):
    np.testing.assert_allclose(a, 1.0, atol=1e-5)
  lc = gt.latent_classification(codes, lm)
  np.testing.assert_array_equal(lc["column_F"][perm], np.arange(len(perm)))
  np.testing.assert_allclose(lc["f1_F"][perm], 1.0)
  dead = np.setdiff1d(np.arange(codes.shape[1]), perm)
  np.testing.assert_array_equal(lc["f1_F"][dead], 0.0)  # a dead latent scores 0


def test_firing_counts_equal_direct_counts():
  rng = np.random.default_rng(1)
  lm, _, _ = _planted(rng, m=200, k=3)
  codes = np.where(rng.random((200, 6)) < 0.4, rng.normal(size=(200, 6)), 0.0)
  c = firing.firing_counts(codes, lm)
  for f in range(6):
    for k in range(3):
      d, y, fire = lm.defined[:, k], lm.values[:, k] == 1, codes[:, f] > 0
      tp, fired, pos = np.sum(fire & y & d), np.sum(fire & d), np.sum(y & d)
      assert (c.tp_FK[f, k], c.fired_FK[f, k], c.positives_K[k]) == (tp, fired, pos)
      p, r = tp / max(fired, 1), tp / pos
      assert c.f1_FK[f, k] == pytest.approx(2 * p * r / (p + r) if tp else 0.0)


def test_null_mcc_closed_form_and_random_codes():
  # One latent: E|r| with r² ~ Beta(1/2, (n − 2)/2) is Γ(b + ½) / (Γ(b + 1)·√π), b = (n − 2)/2.
  for n in (10, 101, 4000):
    b = (n - 2) / 2
    want = math.exp(scipy.special.gammaln(b + 0.5) - scipy.special.gammaln(b + 1)) / math.sqrt(
        math.pi)
    assert gt.null_mcc(n, 1) == pytest.approx(want, rel=1e-6)
  assert gt.null_mcc(500, 64) > gt.null_mcc(500, 8) > gt.null_mcc(5000, 8)
  # Gaussian codes against one fixed feature: the MCC averaged over draws hits the null.
  rng = np.random.default_rng(2)
  n, f = 300, 32
  lm = _binary_lm({"y": (rng.random(n) < 0.3).astype(int)})
  draws = [gt.matched_recovery(rng.normal(size=(n, f)).astype(np.float32), lm).mcc
           for _ in range(40)]
  null = gt.null_mcc(n, f)
  se = np.std(draws, ddof=1) / math.sqrt(len(draws))
  assert abs(np.mean(draws) - null) < 4 * se + 1e-3, (np.mean(draws), null, se)
  # With several features the one-to-one MCC of random codes stays below the best per feature.
  lm3 = _binary_lm({f"y{j}": (rng.random(n) < 0.3).astype(int) for j in range(3)})
  codes = rng.normal(size=(n, f)).astype(np.float32)
  best = np.abs(np.asarray(recovery.correlations(codes, lm3))).max(axis=0).mean()
  assert gt.matched_recovery(codes, lm3).mcc <= best + 1e-6


def _family(rng, counts=(240, 60, 90, 210), f_absorbed=0.25):
  """Parent P, children c1, c2 ⊂ P (disjoint, P ⊋ c1 ∪ c2), with `counts` tokens outside P, in
  c1, in c2 and in P only. Latent 0 is P's latent but silent on a fraction f of c1's tokens;
  latent 1 is c1's; latent 2 is c2's, also firing 0.5 on 7 parent-only tokens and 2.0 on 3
  tokens outside P; latent 3 is weak noise."""
  cls = rng.permutation(np.repeat(np.arange(4), counts))  # 0: outside, 1: c1, 2: c2, 3: P only
  m = cls.size
  p, c1, c2 = cls > 0, cls == 1, cls == 2
  lm = _binary_lm({"P": p.astype(int), "c1": c1.astype(int), "c2": c2.astype(int)})
  h = hierarchy_lib.make_hierarchy(lm, {"P": ["c1", "c2"]})
  codes = np.zeros((m, 4), np.float32)
  c1_idx = np.nonzero(c1)[0]
  n_abs = int(round(f_absorbed * c1_idx.size))
  silent = rng.choice(c1_idx, size=n_abs, replace=False)
  codes[p, 0] = 1.0
  codes[silent, 0] = 0.0
  codes[c1, 1] = 1.5
  codes[c2, 2] = 1.0
  hedge_idx = rng.choice(np.nonzero(cls == 3)[0], size=7, replace=False)
  out_idx = rng.choice(np.nonzero(~p)[0], size=3, replace=False)
  codes[hedge_idx, 2] = 0.5
  codes[out_idx, 2] = 2.0
  codes[:, 3] = np.where(rng.random(m) < 0.05, 0.01, 0.0)
  return lm, h, codes, dict(n_abs=n_abs, n_c1=c1_idx.size, n_p=int(p.sum()), n_c2=int(c2.sum()))


def test_planted_absorption_and_hedging_are_exact():
  lm, h, codes, n = _family(np.random.default_rng(3))
  fl = hierarchy_lib.family_latents(firing.firing_counts(codes, h.columns), h)
  assert [(x.parent_latent, x.child_latents) for x in fl] == [(0, (1, 2))]
  (a,) = hierarchy_lib.absorption(codes, h)
  assert a["children"]["c1"]["absorption"] == n["n_abs"] / n["n_c1"]  # = f exactly
  assert a["children"]["c1"]["absorption"] == 0.25
  assert a["children"]["c2"]["absorption"] == 0.0
  assert a["absorption"] == n["n_abs"] / n["n_p"]
  assert a["absorbed"] == a["silent"] == n["n_abs"]  # every miss taken over by c1's latent
  assert a["parent_silent"] == n["n_abs"] / n["n_p"]
  hedge = {e["child"]: e for e in hierarchy_lib.hedging(codes, h)}
  total = n["n_c2"] * 1.0 + 7 * 0.5 + 3 * 2.0
  assert hedge["c2"]["hedging"] == pytest.approx(3.5 / total)
  assert hedge["c2"]["outside"] == pytest.approx(6.0 / total)
  assert hedge["c2"]["on_child"] == pytest.approx(n["n_c2"] / total)
  assert hedge["c1"]["hedging"] == 0.0 and hedge["c1"]["on_child"] == 1.0
  # No latent fires on the parent: absorption is undefined, not 0.
  (none,) = hierarchy_lib.absorption(np.zeros_like(codes), h)
  assert none["parent_latent"] == -1 and none["absorption"] is None


def test_make_hierarchy_rejects_children_outside_the_parent():
  lm = _binary_lm({"P": [1, 1, 0, 0], "c": [1, 0, 1, 0]})
  with pytest.raises(ValueError, match="child 'c' is positive on 1 tokens where parent 'P'"):
    hierarchy_lib.make_hierarchy(lm, {"P": ["c"]})
  with pytest.raises(ValueError, match="not in the LabelMatrix"):
    hierarchy_lib.make_hierarchy(lm, {"P": ["d"]})


def test_planted_split_counts_the_split_latents():
  rng = np.random.default_rng(4)
  m, s = 900, 3
  y = rng.random(m) < 0.3
  lm = _binary_lm({"y": y.astype(int), "z": (rng.random(m) < 0.2).astype(int)})
  pos = np.nonzero(y)[0]
  codes = np.zeros((m, s + 3), np.float32)
  for i, part in enumerate(np.array_split(rng.permutation(pos), s)):
    codes[part, i] = 1.0 + i  # s latents, each firing on a disjoint share of y
  codes[:, s] = np.where(y | (rng.random(m) < 0.5), 1.0, 0.0)  # fires on y and much else
  codes[pos[:2], s + 1] = 1.0  # precise but negligible recall
  codes[:, s + 2] = np.where(rng.random(m) < 0.3, 1.0, 0.0)  # noise
  out = firing.splitting(codes, lm)
  assert out["count_K"].tolist()[0] == s
  assert out["coverage_K"][0] == 1.0
  whole = firing.splitting(np.where(y, 1.0, 0.0)[:, None], lm)
  assert whole["count_K"][0] == 1


def test_fit_probe_solves_its_normal_equations():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(200, 4)) * [1.0, 3.0, 0.1, 10.0] + [0.0, 5.0, -1.0, 2.0]
  y = (x[:, 0] + 0.3 * rng.normal(size=200) > 0.5).astype(float)
  lam = 1e-2
  mean, scale, beta = sparse_probing.fit_probe(x, y, lam)
  w = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum())
  assert np.sum(w) == pytest.approx(1.0)
  np.testing.assert_allclose(w @ x, mean)
  z = (x - mean) / scale
  grad = z.T @ (w * (z @ beta - (y - 0.5))) + lam * beta
  np.testing.assert_allclose(grad, 0.0, atol=1e-12)


def test_planted_separable_feature_is_probed_perfectly_at_k1():
  rng = np.random.default_rng(6)
  m, d = 1000, 8
  y = rng.random(m) < 0.25
  lm = _binary_lm({"y": y.astype(int)})
  codes = np.maximum(rng.normal(size=(m, 16)), 0).astype(np.float32) * 0.3
  codes[:, 7] = 3.0 * y
  res = sparse_probing.sparse_probe(codes, lm, ks=(1, 2, 5))["y"]
  assert res["k=1"]["dims"] == [7]
  for key in ("k=1", "k=2", "k=5"):
    assert res[key]["accuracy"]["value"] == 1.0 and res[key]["f1"] == 1.0
  assert res["k=1"]["n_test"] == m - int(0.8 * m)
  # Raw activations: the feature lies along a random direction, no single axis separates it.
  u = rng.normal(size=d)
  u /= np.linalg.norm(u)
  acts = rng.normal(size=(m, d)) + 6.0 * np.outer(y, u)
  raw = sparse_probing.sparse_probe(acts, lm, ks=(1,), full=True)["y"]
  assert raw["full"]["accuracy"]["value"] >= 0.98
  assert raw["full"]["accuracy"]["value"] > raw["k=1"]["accuracy"]["value"]
  summ = sparse_probing.summarise_probes({"y": res}, {"y": raw})
  assert summ["minus_raw"]["k=1"]["value"] == pytest.approx(
      1.0 - raw["k=1"]["accuracy"]["value"])
  # A column without test positives is skipped, not scored.
  late = np.zeros(m, int)
  late[:10] = 1
  assert sparse_probing.sparse_probe(codes, _binary_lm({"late": late}))["late"] is None


def test_shrinkage_of_a_scaled_reconstruction():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(300, 6))
  out = gt.shrinkage(x, 0.8 * x)
  assert out["norm_ratio"]["value"] == pytest.approx(0.8)
  assert out["gamma"] == pytest.approx(1.25)
  assert out["gamma_se"] == pytest.approx(0.0, abs=1e-12)
  assert out["rel_error"] == pytest.approx(0.04)
  assert out["rel_error_rescaled"] == pytest.approx(0.0, abs=1e-12)
  noisy = 0.7 * x + 0.2 * rng.normal(size=x.shape)
  want = np.linalg.lstsq(noisy.reshape(-1, 1), x.reshape(-1), rcond=None)[0][0]
  got = gt.shrinkage(x, noisy)
  assert got["gamma"] == pytest.approx(want)
  assert got["rel_error_rescaled"] < got["rel_error"]


@pytest.fixture(scope="module", name="dyck")
def dyck_fixture():
  """The Dyck batch of the tiny-LM tests: grammar, LabelMatrix, tokens_M, raw labels, mask."""
  data = fakes.dyck_batch()
  mask = np.asarray(data.sentence_mask)
  labels = {k: np.asarray(v) for k, v in grammars.labels(fakes.DYCK, data.tokens).items()}
  lm = recovery.label_matrix(labels, grammars.label_info(fakes.DYCK), mask)
  return data, lm, labels, mask


def test_dyck_hierarchy_is_inside_brackets_over_depths(dyck):
  _, lm, labels, mask = dyck
  h = hierarchy_lib.grammar_hierarchy(fakes.DYCK, lm, min_positives=3)
  (fam,) = h.families
  assert fam.parent == "depth_after>=1"
  depth = labels["depth_after"][mask]
  for child in fam.children:
    k = int(child.split("=")[1])
    j = h.columns.names.index(child)
    np.testing.assert_array_equal(h.columns.values[:, j] == 1, depth == k)
    np.testing.assert_array_equal(h.columns.defined[:, j], depth >= 0)
    assert np.sum(depth == k) >= 3
  assert [int(c.split("=")[1]) for c in fam.children][:2] == [1, 2]
  assert h.columns.values[:, 0].sum() == np.sum(depth >= 1)
  rare = hierarchy_lib.grammar_hierarchy(fakes.DYCK, lm, min_positives=10**6)
  assert rare.families == () and rare.columns.num_columns == 0


def _expr_labels():
  g = grammars.get("expr_prefix")
  batch = grammars.sample(jax.random.key(3), g, 16, 48)
  mask = np.asarray(batch.sentence_mask)
  labels = {k: np.asarray(v)[mask] for k, v in grammars.labels(g, batch.tokens).items()}
  return g, labels, grammars.label_info(g), np.asarray(batch.tokens)[mask]


def _english_labels():
  """English `pos` labels built from the vocabulary (noun3 is an N, ...), on random words; the
  CKY-based real labels are labels_test's subject."""
  g = grammars.get("english")
  cats = g.info.categories
  prefix = {"noun": "N", "verb": "V", "adj": "Adj", "pro": "Pro", "adv": "Adv", "conj": "Conj"}
  words = [i for i, w in enumerate(g.vocab[:g.n_terminals]) if w.rstrip("0123456789") in prefix]
  tokens_M = np.random.default_rng(9).choice(words, size=400)
  pos = np.array([cats.index(prefix[g.vocab[t].rstrip("0123456789")]) for t in tokens_M])
  return g, {"pos": pos}, {"pos": grammars.label_info(g)["pos"]}, tokens_M


@pytest.mark.parametrize("make,parent_label", [(_english_labels, "pos"),
                                               (_expr_labels, "token_class")])
def test_token_hierarchies_split_classes_into_their_tokens(make, parent_label):
  g, labels, info, tokens_M = make()
  lm = recovery.label_matrix(labels, info)
  h = hierarchy_lib.grammar_hierarchy(g, lm, tokens_M, min_positives=3)
  assert h.families
  cls = labels[parent_label]
  classes = info[parent_label].classes
  for fam in h.families:
    assert fam.parent.startswith(parent_label + "=") and len(fam.children) >= 2
    ci = classes.index(fam.parent.split("=")[1])
    for child in fam.children:
      tok = g.token_id(child.split("=", 1)[1])
      j = h.columns.names.index(child)
      np.testing.assert_array_equal(h.columns.values[:, j] == 1, (tokens_M == tok) & (cls == ci))
      assert np.sum((tokens_M == tok) & (cls == ci)) >= 3
  with pytest.raises(ValueError, match="pass tokens_M"):
    hierarchy_lib.grammar_hierarchy(g, lm)


def test_summary_of_stacked_variants_equals_single_variant_summaries():
  rng = np.random.default_rng(8)
  lm, h, codes, _ = _family(rng, counts=(120, 40, 60, 80))
  acts = rng.normal(size=(300, 5)).astype(np.float32)
  noisy = codes + np.where(rng.random(codes.shape) < 0.1, 0.3, 0.0).astype(np.float32)
  recon = np.stack([0.9 * acts, 0.5 * acts])
  both = gt.ground_truth_summary(np.stack([codes, noisy]), lm, h, acts, recon, ids=["a", "b"])
  json.dumps(both, allow_nan=False)
  one = gt.ground_truth_summary(noisy, lm, h, acts, recon[1])
  assert both["variants"]["b"] == one["variants"]["0"]
  va = both["variants"]["a"]
  assert va["absorption"]["families"][0]["children"]["c1"]["absorption"] == 0.25
  assert va["shrinkage"]["gamma"] == pytest.approx(1 / 0.9, rel=1e-5)
  assert both["features"] == ["P", "c1", "c2"] and both["hierarchy"] == {"P": ["c1", "c2"]}
  with pytest.raises(ValueError, match="recon must be"):
    gt.ground_truth_summary(codes, lm, h, acts, recon)


def test_summary_on_a_tiny_lm_and_sae_grid_is_json_and_consistent(dyck):
  """The tiny Dyck LM of the intervention tests and two freshly initialised SAE variants (TopK
  and ReLU) at its last residual site: shapes, strict JSON, and agreement with the parts."""
  data, lm, _, mask = dyck
  lm_params = fakes.tiny_dyck_lm()
  site = model_lib.site_names(fakes.TINY_DYCK_MC)[-1]
  acts = model_lib.apply(lm_params, data.tokens, fakes.TINY_DYCK_MC, collect=(site,)).acts[site]
  acts_MD = np.asarray(acts)[mask]
  d = acts_MD.shape[1]
  codes, recon = [], []
  for i, cfg in enumerate([sae_lib.SAEConfig(d_in=d, width=2 * d, activation="topk", k_max=4),
                           sae_lib.SAEConfig(d_in=d, width=2 * d)]):
    params = sae_lib.init(jax.random.key(i), cfg)
    z = sae_lib.encode(params, jnp.asarray(acts_MD), cfg, sae_lib.default_hparams(cfg))
    codes.append(np.asarray(z))
    recon.append(np.asarray(sae_lib.decode(params, z, cfg)))
  codes, recon = np.stack(codes), np.stack(recon)
  tokens_M = np.asarray(data.tokens)[mask]
  h = hierarchy_lib.grammar_hierarchy(fakes.DYCK, lm, tokens_M, min_positives=3)
  out = gt.ground_truth_summary(codes, lm, h, acts_MD, recon, ids=["topk", "relu"])
  assert json.loads(json.dumps(out, allow_nan=False)) == out
  assert set(out["variants"]) == {"topk", "relu"}
  # The scored columns: lm's binary ones, then the hierarchy's new ones.
  names = list(lm.binary().names) + [n for n in h.columns.names if n not in lm.names]
  assert out["features"] == names
  features = gt.union_columns(lm.binary(), h.columns)
  for i, vid in enumerate(["topk", "relu"]):
    v = out["variants"][vid]
    mr = gt.matched_recovery(codes[i], features)
    assert v["mcc"]["value"] == pytest.approx(mr.mcc, abs=1e-12)
    assert v["mcc"]["n"] == min(codes.shape[2], len(names))
    assert 0.0 <= v["mcc"]["value"] <= 1.0 and 0 < v["mcc_null"] < 1
    assert set(v["features"]) == set(names)
    assert v["shrinkage"]["gamma"] == pytest.approx(gt.shrinkage(acts_MD, recon[i])["gamma"])
    assert set(v["probing"]["raw"]) == {"k=1", "k=2", "k=5", "full"}
    assert len(v["absorption"]["families"]) == len(h.families) == 1
    assert len(v["hedging"]["children"]) == len(h.families[0].children)


def test_full_probe_from_shared_moments_equals_the_direct_fit():
  rng = np.random.default_rng(10)
  m, d = 600, 6
  y = rng.random(m) < 0.3
  und = rng.random(m) < 0.1
  lm = _binary_lm({"y": y.astype(int), "rare": (rng.random(m) < 0.9).astype(int)},
                  {"y": und, "rare": und})
  acts = (rng.normal(size=(m, d)) + 1.5 * np.outer(y, rng.normal(size=d)) + 50.0)  # offset
  acts[:, 2] = 7.0  # a constant input is dropped, not divided by 0
  out = sparse_probing.sparse_probe(acts, lm, ks=(), full=True)
  train = sparse_probing.train_mask(m, 0.8)
  for j, name in enumerate(lm.names):
    d_ok, yy = lm.defined[:, j], lm.values[:, j]
    tr, te = d_ok & train, d_ok & ~train
    mean, scale, beta = sparse_probing.fit_probe(acts[tr], yy[tr])
    assert beta[2] == 0.0
    pred = ((acts[te] - mean) / scale) @ beta > 0
    correct = int(np.sum(pred == (yy[te] == 1)))
    assert out[name]["full"]["accuracy"]["successes"] == correct, name

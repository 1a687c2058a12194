"""Feature recovery: planted latents, NumPy / brute-force references, degenerate latents,
matching optimality, label expansion on real grammar labels, and codes of a trained grid against
per-variant `sae.encode`. (Dictionary geometry: geometry_test.py.)"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from jaxsae import grammars
from jaxsae.analysis import codes as codes_lib
from jaxsae.analysis import geometry
from jaxsae.analysis import recovery
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import train_sae as ts
from jaxsae.grid import trained as trained_lib
from jaxsae.lm import model as model_lib

BIN = grammars.LabelInfo("binary")
ORD = grammars.LabelInfo("ordinal")
CAT = grammars.LabelInfo("categorical", ("a", "b", "c"))


def _labels(rng, m):
  """A binary, an ordinal and a 3-class label over m tokens, each with its own undefined set."""
  undef = lambda p: rng.random(m) < p
  binary = np.where(undef(0.2), -1, rng.integers(0, 2, m))
  ordinal = np.where(undef(0.3), -1, rng.integers(0, 6, m))
  cat = np.where(undef(0.25), -1, rng.integers(0, 3, m))
  labels = {"flag": binary, "level": ordinal, "kind": cat}
  info = {"flag": BIN, "level": ORD, "kind": CAT}
  return labels, info


def _pairwise_auroc(x, y, defined):
  pos, neg = x[defined & (y == 1)], x[defined & (y == 0)]
  if not len(pos) or not len(neg):
    return 0.5
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _sweep_f1(x, y, defined):
  x, y = x[defined], y[defined]
  best = 0.0
  for t in np.unique(x):
    pred = x >= t
    tp = np.sum(pred & (y == 1))
    fp, fn = np.sum(pred & (y == 0)), np.sum(~pred & (y == 1))
    best = max(best, 2 * tp / max(2 * tp + fp + fn, 1))
  return best


def test_planted_latent_is_recovered_and_negation_flips():
  rng = np.random.default_rng(0)
  m = 240
  labels, info = _labels(rng, m)
  lm = recovery.label_matrix(labels, info)
  j = lm.names.index("flag")
  y = lm.values[:, j]
  noise = np.maximum(rng.normal(size=(m, 6)), 0).astype(np.float32)
  planted = noise.copy()
  planted[:, 4] = y  # equal to the label where defined (0 elsewhere)
  negated = noise.copy()
  negated[:, 2] = -y
  corr = np.asarray(recovery.correlations(planted, lm))
  auc = np.asarray(recovery.auroc(planted, lm.binary()))
  f1 = np.asarray(recovery.best_f1(planted, lm.binary()))
  jb = lm.binary().names.index("flag")
  np.testing.assert_allclose(corr[4, j], 1.0, atol=1e-5)
  np.testing.assert_allclose(auc[4, jb], 1.0, atol=1e-6)
  np.testing.assert_allclose(f1[4, jb], 1.0, atol=1e-6)
  assert np.all(np.abs(np.delete(corr[:, j], 4)) < 0.4)
  best = {b["label"]: b for b in recovery.best_latents(corr, lm.names)}
  assert best["flag"]["latent"] == 4 and best["flag"]["score"] == pytest.approx(1.0, abs=1e-5)
  assert recovery.best_latents(auc, lm.binary().names, absolute=False)[jb]["latent"] == 4
  corr_neg = np.asarray(recovery.correlations(negated, lm))
  auc_neg = np.asarray(recovery.auroc(negated, lm.binary()))
  np.testing.assert_allclose(corr_neg[2, j], -1.0, atol=1e-5)
  np.testing.assert_allclose(auc_neg[2, jb], 0.0, atol=1e-6)
  best_neg = {b["label"]: b for b in recovery.best_latents(corr_neg, lm.names)}
  assert best_neg["flag"]["latent"] == 2
  assert best_neg["flag"]["score"] == pytest.approx(-1.0, abs=1e-5)  # signed value reported


def test_correlations_equal_numpy_corrcoef():
  rng = np.random.default_rng(1)
  n, m, f = 2, 300, 5
  labels, info = _labels(rng, m)
  lm = recovery.label_matrix(labels, info)
  codes = np.maximum(rng.normal(size=(n, m, f)), 0).astype(np.float32)
  codes[1, :, 3] = 10.0 + 0.1 * rng.normal(size=m)  # a large offset: conditioning
  got = np.asarray(recovery.correlations(codes, lm))
  assert got.shape == (n, f, lm.num_columns)
  for i, a, k in itertools.product(range(n), range(f), range(lm.num_columns)):
    d = lm.defined[:, k]
    want = np.corrcoef(codes[i, d, a].astype(np.float64), lm.values[d, k])[0, 1]
    np.testing.assert_allclose(got[i, a, k], want, atol=2e-5, err_msg=f"{i} {a} {lm.names[k]}")
  np.testing.assert_allclose(np.asarray(recovery.correlations(codes[1], lm)), got[1], atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 4])
def test_auroc_and_best_f1_equal_brute_force_with_ties(chunk, monkeypatch):
  if chunk:  # latents in chunks of 4 (the last one padded), as for large M·F
    monkeypatch.setattr(recovery, "_chunk", lambda per_latent, num_latents: chunk)
    recovery._binary_scores.clear_cache()  # pylint: disable=protected-access
  rng = np.random.default_rng(2)
  n, m, f = 2, 240, 6
  labels, info = _labels(rng, m)
  lm = recovery.label_matrix(labels, info).binary()
  assert lm.names == ("flag", "kind=a", "kind=b", "kind=c")
  # Few distinct values: many ties, within and across the classes.
  codes = rng.integers(0, 4, size=(n, m, f)).astype(np.float32) * (rng.random((n, m, f)) < 0.6)
  auc = np.asarray(recovery.auroc(codes, lm))
  f1 = np.asarray(recovery.best_f1(codes, lm))
  recovery._binary_scores.clear_cache()  # pylint: disable=protected-access
  for i, a, k in itertools.product(range(n), range(f), range(lm.num_columns)):
    d, y, x = lm.defined[:, k], lm.values[:, k], codes[i, :, a]
    np.testing.assert_allclose(auc[i, a, k], _pairwise_auroc(x, y, d), atol=1e-5)
    np.testing.assert_allclose(f1[i, a, k], _sweep_f1(x, y, d), atol=1e-5)


def test_dead_and_constant_latents_give_neutral_scores_and_no_nan():
  rng = np.random.default_rng(3)
  m = 240
  labels, info = _labels(rng, m)
  labels["always"] = np.ones(m, np.int64)  # a constant (binary) column
  info["always"] = BIN
  lm = recovery.label_matrix(labels, info)
  codes = np.maximum(rng.normal(size=(m, 6)), 0).astype(np.float32)
  codes[:, 0] = 0.0  # dead
  codes[:, 2] = 3.7  # constant
  corr = np.asarray(recovery.correlations(codes, lm))
  auc = np.asarray(recovery.auroc(codes, lm.binary()))
  f1 = np.asarray(recovery.best_f1(codes, lm.binary()))
  for s in (corr, auc, f1):
    assert np.all(np.isfinite(s))
  np.testing.assert_array_equal(corr[[0, 2]], 0.0)
  np.testing.assert_array_equal(corr[:, lm.names.index("always")], 0.0)
  np.testing.assert_array_equal(auc[[0, 2]], 0.5)
  np.testing.assert_array_equal(auc[:, lm.binary().names.index("always")], 0.5)
  # The live latents are untouched by their dead neighbours.
  for a, k in itertools.product((1, 3, 4, 5), range(lm.num_columns - 1)):
    d = lm.defined[:, k]
    want = np.corrcoef(codes[d, a], lm.values[d, k])[0, 1]
    np.testing.assert_allclose(corr[a, k], want, atol=2e-5)


def _brute_matching(s):
  f, k = s.shape
  return max(sum(abs(s[p[j], j]) for j in range(k))
             for p in itertools.permutations(range(f), k)) / k


def test_matching_is_optimal_and_invariant_to_permuting_latents():
  rng = np.random.default_rng(4)
  scores = rng.uniform(-1, 1, size=(6, 4))
  mean, assignment = recovery.matching_score(scores)
  assert mean == pytest.approx(_brute_matching(scores))
  assert len(set(assignment.tolist())) == 4
  assert mean == pytest.approx(np.mean(np.abs(scores[assignment, np.arange(4)])))
  perm = rng.permutation(6)
  mean_p, assignment_p = recovery.matching_score(scores[perm])
  assert mean_p == pytest.approx(mean)
  np.testing.assert_array_equal(perm[assignment_p], assignment)
  # More labels than latents: the unmatched label counts 0.
  small = scores[:2, :3]
  mean_s, assignment_s = recovery.matching_score(small)
  assert np.sum(assignment_s == -1) == 1
  best_pair = max(abs(small[a, i]) + abs(small[b, j]) for i, j in
                  itertools.permutations(range(3), 2) for a, b in ((0, 1), (1, 0)))
  assert mean_s == pytest.approx(best_pair / 3)


def test_label_matrix_expands_categorical_labels_of_dyck2():
  g = grammars.get("dyck2")
  batch = grammars.sample(jax.random.key(5), g, 16, 32)  # the shapes analysis_batch uses
  labels = {k: np.asarray(v) for k, v in grammars.labels(g, batch.tokens).items()}
  info = grammars.label_info(g)
  mask = np.asarray(batch.sentence_mask)
  lm = recovery.label_matrix(labels, info, mask)
  expected = []
  for name, li in info.items():
    expected += [f"{name}={c}" for c in li.classes] if li.kind == "categorical" else [name]
  assert lm.names == tuple(expected)
  assert "bracket_type=0" in lm.names and "top_type_after=1" in lm.names
  assert lm.values.shape == lm.defined.shape == (mask.sum(), len(expected))
  for k, (name, src) in enumerate(zip(lm.names, lm.sources)):
    raw = labels[src][mask]
    np.testing.assert_array_equal(lm.defined[:, k], raw >= 0)
    if "=" in name:
      j = info[src].classes.index(name.split("=")[1])
      np.testing.assert_array_equal(lm.values[:, k], (raw == j) * (raw >= 0))
      assert lm.kinds[k] == "class"
    else:
      np.testing.assert_array_equal(lm.values[:, k], np.maximum(raw, 0))
  for src in ("bracket_type", "top_type_after"):
    cols = [k for k, s in enumerate(lm.sources) if s == src]
    d = lm.defined[:, cols[0]]
    np.testing.assert_array_equal(lm.values[d][:, cols].sum(axis=1), 1.0)
    assert 0 < d.sum()
  assert not lm.defined[:, lm.names.index("top_type_after=0")].all()  # empty stack: undefined
  bad = dict(labels, is_open=np.where(labels["is_open"] == 1, 2, labels["is_open"]))
  with pytest.raises(ValueError, match="binary label 'is_open' has value 2"):
    recovery.label_matrix(bad, info, mask)
  with pytest.raises(ValueError, match="codes cover 3 tokens"):
    recovery.correlations(np.zeros((3, 4)), lm)
  with pytest.raises(ValueError, match="Pass lm.binary"):
    recovery.auroc(np.zeros((lm.num_tokens, 4)), lm)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("analysis")
  c = fakes.smoke_sae_config(
      fakes.write_smoke_lm(root / "lm"),
      [{"product": {"k": [2, 3]}, "set": {"loss": "local", "activation": "batchtopk",
                                          "expansion": 2}}],
      steps=2, log_every=2, checkpoint_every=2)
  ts.run(c, str(root / "sae"))
  return trained_lib.load(str(root / "sae"))


def test_collect_codes_equals_per_variant_encode(trained):
  setup = trained.setup
  batch = codes_lib.analysis_batch(trained, jax.random.key(7), 16)
  mask = batch.mask_BT
  forward = jax.jit(lambda p, t: model_lib.apply(p, t, setup.model_config,
                                                  collect=(setup.site,)).acts[setup.site])
  acts = forward(trained.lm.params, jnp.asarray(batch.tokens_BT))  # the full forward
  x_MD = np.asarray(acts)[mask]
  assert [(s.sae.activation, s.size) for s in setup.specs] == [("batchtopk", 2)]
  for gi, spec in enumerate(setup.specs):
    codes = np.asarray(codes_lib.collect_codes(trained, gi, batch.tokens_BT, mask))
    assert codes.shape == (spec.size, mask.sum(), spec.sae.width)
    group, hyper = trained.state.groups[gi], trained.hypers[gi]
    one = lambda tree, i: jax.tree.map(lambda a: jnp.asarray(a)[i], tree)
    assert np.all(np.asarray(group.sae_state.threshold) > 0)  # the learned threshold is used
    for i in range(spec.size):
      want = sae_lib.encode(one(group.params, i), jnp.asarray(x_MD), spec.sae,
                            one(hyper.hparams, i), state=one(group.sae_state, i))
      np.testing.assert_allclose(codes[i], np.asarray(want), rtol=1e-5, atol=1e-6)
    sub = np.asarray(codes_lib.collect_codes(trained, gi, batch.tokens_BT, mask, variants=[1]))
    np.testing.assert_allclose(sub[0], codes[1], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="spec_index=5 out of range"):
    codes_lib.collect_codes(trained, 5, batch.tokens_BT, mask)


def test_summarise_on_a_trained_group_is_consistent_and_json(trained):
  batch = codes_lib.analysis_batch(trained, jax.random.key(8), 16)
  lm = batch.label_matrix()
  codes = codes_lib.collect_codes(trained, 0, batch.tokens_BT, batch.mask_BT)
  spec, group = trained.setup.specs[0], trained.state.groups[0]
  decoders = jax.vmap(lambda p: sae_lib.dictionary(p, spec.sae))(group.params)[: spec.size]
  out = recovery.summarise(codes, lm, decoders, ids=spec.ids)
  json.loads(json.dumps(out, allow_nan=False))
  assert set(out["variants"]) == set(spec.ids)
  corr = np.asarray(recovery.correlations(codes, lm))
  auc = np.asarray(recovery.auroc(codes, lm.binary()))
  for i, vid in enumerate(spec.ids):
    v = out["variants"][vid]
    best_abs = np.abs(corr[i]).max(axis=0)
    assert v["n_labels_corr_ge_0.5"] == int(np.sum(best_abs >= 0.5))
    assert v["matching_score"] == pytest.approx(recovery.matching_score(corr[i])[0], abs=1e-6)
    assert v["dead_latents"] == int(np.sum(np.all(np.asarray(codes[i]) == 0, axis=0)))
    assert v["dictionary"]["mean"] == pytest.approx(
        geometry.dictionary_similarity(decoders[i]).mean, abs=1e-6)
    for k, name in enumerate(lm.names):
      entry = v["labels"][name]
      assert entry["corr"] == pytest.approx(corr[i, entry["latent"], k], abs=1e-6)
      assert abs(entry["corr"]) == pytest.approx(best_abs[k], abs=1e-6)
      if lm.kinds[k] in recovery.BINARY_KINDS:
        kb = lm.binary().names.index(name)
        assert entry["best_auroc"] == pytest.approx(auc[i, :, kb].max(), abs=1e-6)


def test_analysis_stage_on_a_transcoder_grid(tmp_path):
  """Features and ground truth from the codes of MLP 1's input, no shrinkage (x̂ stands for
  the MLP output); causal predictability (spliced at the site) is refused before anything
  is written."""
  from experiments.configs import pipeline as pipeline_configs  # pylint: disable=g-import-not-at-top
  from jaxsae.analysis import stage  # pylint: disable=g-import-not-at-top
  c = fakes.smoke_sae_config(
      fakes.write_smoke_lm(tmp_path / "lm"),
      [{"set": {"loss": "local", "expansion": 2, "target_site": "mlp_out.1"}}],
      site="mlp_in.1", steps=2, log_every=2, checkpoint_every=2)
  ts.run(c, str(tmp_path / "sae"))
  a = pipeline_configs.get_config("smoke").analysis
  a.num_sequences = 4
  with pytest.raises(ValueError, match=r"g0 are transcoders.*set analysis.causal=False"):
    stage.run(a, str(tmp_path / "sae"), str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()
  a.causal = False
  out = stage.run(a, str(tmp_path / "sae"), str(tmp_path / "analysis"))
  (vid,) = out["features"]["variants"]
  gt = out["ground_truth"]["variants"][vid]
  assert "shrinkage" not in gt and np.isfinite(gt["mcc"]["value"])

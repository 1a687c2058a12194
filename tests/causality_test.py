"""Tests for jaxsae.analysis.causality: label columns and Pearson correlations against NumPy, expected
effects derived from data (English), causal predictability of planted latents against the
random-latent null, pair scoring against fake outcomes (a planted effect passes the null, random
latents pass at the nominal rate), and input validation."""

import jax
import numpy as np
import pytest

import fakes
from jaxsae import grammars
from jaxsae.analysis import causality
from jaxsae.grammars import token_classes
from jaxsae.grid import sae as sae_lib

DYCK, MC = fakes.DYCK, fakes.TINY_DYCK_MC


lm, data = fakes.TINY_DYCK_LM_FIXTURE, fakes.DYCK_BATCH_FIXTURE


# ------------------------------------------------------------------------------------------------
# Labels, correlations, expected effects.


def test_label_columns_and_pearson(data):
  names, values = causality.label_columns(DYCK, data.tokens)
  assert "top_type_after=0" in names and "depth_after" in names
  depth = np.asarray(grammars.labels(DYCK, data.tokens)["depth_after"])
  col = values[..., names.index("depth_after")]
  np.testing.assert_array_equal(np.isnan(col), depth < 0)
  rng = np.random.default_rng(3)
  y = values.reshape(-1, len(names))
  x = rng.random((y.shape[0], 3))
  x[:, 1] = np.nan_to_num(y[:, names.index("depth_after")]) + 0.1 * x[:, 0]
  corr = causality.pearson(x, y)
  for k in (names.index("depth_after"), names.index("is_open")):
    ok = np.isfinite(y[:, k])
    for f in range(3):
      np.testing.assert_allclose(corr[f, k], np.corrcoef(x[ok, f], y[ok, k])[0, 1], rtol=1e-6)
  assert corr[1, names.index("depth_after")] > 0.9


def test_english_expectations_come_from_data():
  eng = grammars.get("english")
  batch = grammars.sample(jax.random.key(4), eng, 16, 28)
  tokens, mask = np.asarray(batch.tokens), np.asarray(batch.sentence_mask)
  cats = eng.info.categories
  # Part-of-speech columns built from the lexicon (the sampled sentences are grammatical), so
  # the test does not need the CKY labeller.
  cat_of = {i: w.rstrip("0123456789") for i, w in enumerate(eng.vocab[:eng.n_terminals])}
  stem = {"noun": "N", "verb": "V", "adj": "Adj", "pro": "Pro", "adv": "Adv", "conj": "Conj"}
  pos = np.full(tokens.shape, -1)
  for (b, t) in zip(*np.nonzero(mask)):
    pos[b, t] = cats.index(stem[cat_of[int(tokens[b, t])]])
  names = tuple(f"pos={c}" for c in cats) + ("eos_legal", "depth")
  values = np.stack([np.where(pos >= 0, (pos == i).astype(float), np.nan)
                     for i in range(len(cats))] + [np.zeros(tokens.shape)] * 2, -1)
  exp = causality.expected_effects(eng, names, tokens, mask, label_values_BTK=values)
  classes, member = token_classes.token_classes(eng)
  assert set(exp) == set(names[:len(cats)]) | {"eos_legal"}  # depth: no expectation
  np.testing.assert_array_equal(exp["eos_legal"], member[:, eng.eos_id].astype(float))
  # NP -> Adj N: an adjective is always followed by a noun, which nothing else is as often.
  w = exp["pos=Adj"]
  assert classes[int(np.argmax(w))] == "N" and w[classes.index("eos")] < 0
  # Against P(next class | label) − P(next class | not label), counted directly.
  nxt = np.array([[classes.index("eos") if v == eng.eos_id else 1 + cats.index(
      stem[cat_of[int(v)]]) if v < eng.n_terminals else -1 for v in row[1:]] for row in tokens])
  sel, lab = mask[:, :-1], pos[:, :-1]
  for c in ("N", "Adv"):
    i = cats.index(c)
    want = [np.mean(nxt[sel & (lab == i)] == j) - np.mean(nxt[sel & (lab != i)] == j)
            for j in range(len(classes))]
    np.testing.assert_allclose(exp[f"pos={c}"], want, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Causal predictability.


def _planted(lm, sign, width=16):
  return fakes.planted_eos_sae(lm["wte"], MC.d_model, DYCK.eos_id, sign, width)


def test_causal_predictability_counts_planted_latent(lm, data):
  names, _ = causality.label_columns(DYCK, data.tokens)
  k = names.index("stack_empty_after")
  results = {}
  for sign, corr_sign in ((1, 1), (-1, 1), (1, -1)):
    config, params = _planted(lm, sign, width=48)  # enough live random latents for a null
    corr = np.zeros((config.width, len(names)))
    corr[5, k] = 0.9 * corr_sign
    corr[3, names.index("match_distance")] = 0.8  # no expected effect: untestable
    corr[7, k] = 0.7  # never fires: not tested
    corr[2, k] = 0.1  # below the threshold
    out = causality.causal_predictability(
        causality.SplicedSAE(lm, MC, "ln_final", params, config, sae_lib.default_hparams(config)),
        data.tokens, data.sentence_mask, DYCK, corr, names,
        causality.CausalSettings(threshold=0.5, high_scale=3.0, null_latents=24))
    assert (out["n_strong"], out["n_tested"], out["n_untestable_label"],
            out["n_inactive_latent"]) == (3, 1, 1, 1)
    pair = out["pairs"][0]
    assert pair["latent"] == 5 and pair["label"] == "stack_empty_after"
    assert pair["high_value"] == pytest.approx(3.0)  # 3 × its only active value
    results[(sign, corr_sign)] = (pair, out)
  pair, out = results[(1, 1)]
  # The null: 24 random live latents unrelated to the label (so never 5); it beats them all.
  assert out["null"]["size"] == 24 == pair["n_null"] and 5 not in out["null"]["latents"]
  assert sorted(out["null"]["per_label"]["stack_empty_after"]) == out["null"]["latents"]
  assert pair["p_value"] == pytest.approx(1 / (pair["n_null"] + 1))
  assert pair["signed_effect"] > pair["null_quantile"]
  assert pair["as_predicted"] and out["fraction_as_predicted"] == 1.0
  assert pair["shift"]["eos"] > 0.1 and pair["shift_high_vs_spliced"]["eos"] > 0.05
  assert out["not_as_predicted"] == [] and out["mean_effect"] > 0
  for key in ((-1, 1), (1, -1)):  # reversed planting, or the label anti-correlated
    pair, out = results[key]
    assert not pair["as_predicted"] and not pair["right_sign"] and pair["p_value"] == 1.0
    assert out["fraction_as_predicted"] == 0.0
    assert out["not_as_predicted"] == [pair] and out["mean_effect"] < 0
  assert results[(-1, 1)][0]["shift"]["eos"] < 0


def test_score_pairs_against_fake_outcomes():
  classes = ("eos", "close", "close0", "close1")
  names = ("a", "b", "c")
  expected = {"a": np.array([1.0, -1.0, 0, 0]), "b": np.array([0, 0, 1.0, -1.0])}
  rng = np.random.default_rng(0)
  n_f = 64  # latents 0-3 as below; 4.. are weak random latents, the null's pool
  corr = np.zeros((n_f, 3))
  corr[:4] = [[0.9, 0.0, 0.95], [0.0, -0.6, 0.0], [0.55, 0.0, 0.0], [np.nan, 0.8, 0.0]]
  corr[4:] = rng.uniform(-0.3, 0.3, (n_f - 4, 3))
  shifts = rng.normal(0, 0.01, (n_f, 4))
  shifts[:4] = [[0.2, -0.1, 0, 0], [0, 0, -0.3, 0.1], [-0.1, 0.3, 0, 0], [0, 0, -0.05, 0.05]]
  live = np.ones(n_f, bool)
  live[9] = False  # a dead latent: neither tested nor in the null
  calls = []

  def shift_fn(latents):
    calls.append(latents.tolist())
    return shifts[latents], [{"extra": int(f)} for f in latents]

  out = causality.score_pairs(corr, names, expected, classes, shift_fn, threshold=0.5,
                              max_pairs=3, testable_latents=live, null_latents=40, seed=1)
  # The 3 strongest of the 4 testable pairs ((2, a) is the weakest); c has no expected effect;
  # one call measures the tested latents and each tested label's 40 unrelated live latents,
  # the first in one random order (so a and b share all but the latents only one avoids).
  per_label = out["null"]["per_label"]
  assert set(per_label) == {"a", "b"}
  order = list(np.random.default_rng(1).permutation(np.nonzero(live)[0]))
  for lab, null in per_label.items():
    k = names.index(lab)
    assert null == [j for j in order if not abs(corr[j, k]) >= 0.5][:40]
  pool = out["null"]["latents"]
  assert pool == sorted(set(per_label["a"]) | set(per_label["b"])) and 9 not in pool
  assert out["null"]["size"] == len(pool) and out["null"]["min_size"] == 19
  assert calls == [sorted(set(pool) | {0, 1, 3})]
  assert (out["n_strong"], out["n_untestable_label"], out["n_testable"], out["n_tested"],
          out["n_null_too_small"]) == (5, 1, 4, 3, 0)
  got = {(p["latent"], p["label"]): p for p in out["pairs"]}
  assert set(got) == {(0, "a"), (1, "b"), (3, "b")}
  for (f, lab), p in got.items():
    w = expected[lab]
    k = names.index(lab)
    sign = np.sign(corr[f, k])
    effect = w @ shifts[f] / np.abs(w).sum()
    assert p["effect"] == pytest.approx(effect) and p["extra"] == f
    assert p["right_sign"] == (sign * effect > 0)
    # The null by hand: the label's latents, none of them f or strong for the label.
    assert f not in per_label[lab]
    null = [sign * (w @ shifts[j]) / np.abs(w).sum() for j in per_label[lab]]
    assert p["n_null"] == len(null) == 40
    assert p["p_value"] == pytest.approx((1 + np.sum(np.array(null) >= sign * effect))
                                         / (1 + len(null)))
    assert p["as_predicted"] == (p["right_sign"] and p["p_value"] <= 0.05)
  # Strongest first. 0: eos up, close down: as predicted, far above the null; 3: close0 down:
  # against; 1: close0 down with corr < 0: the right sign and far above the null.
  assert [p["latent"] for p in out["pairs"]] == [0, 3, 1]
  assert [p["as_predicted"] for p in out["pairs"]] == [True, False, True]
  assert out["fraction_as_predicted"] == pytest.approx(2 / 3)
  lo, hi = out["fraction_as_predicted_interval"]
  assert lo < 2 / 3 < hi
  assert len(out["not_as_predicted"]) == 1 and out["n_right_sign"] == 2


def test_score_pairs_small_right_sign_effects_do_not_pass():
  """An effect of the right sign but no larger than random latents' (the −1.8e-7 kind) fails."""
  classes = ("eos", "close")
  expected = {"a": np.array([1.0, 0.0])}
  rng = np.random.default_rng(2)
  shifts = rng.normal(0, 1e-3, (100, 2))
  shifts[0] = [1e-7, 0.0]  # right sign, tiny
  corr = np.zeros((100, 1))
  corr[0, 0] = 0.9
  out = causality.score_pairs(corr, ("a",), expected, classes,
                              lambda f: (shifts[f], [{} for _ in f]), null_latents=99)
  pair, = out["pairs"]
  assert pair["right_sign"] and not pair["as_predicted"] and pair["p_value"] > 0.05
  assert out["fraction_right_sign"] == 1.0 and out["fraction_as_predicted"] == 0.0
  # Too few live latents for a 5% test (9 unrelated; 19 needed): not tested, not a failure.
  shifts[0] = [1.0, 0.0]
  few = causality.score_pairs(corr[:10], ("a",), expected, classes,
                              lambda f: (shifts[f], [{} for _ in f]), null_latents=99)
  assert (few["n_strong"], few["n_null_too_small"], few["n_testable"], few["n_tested"]) == (
      1, 1, 0, 0)
  assert few["pairs"] == [] and few["fraction_as_predicted"] is None


def test_score_pairs_null_avoids_latents_the_label_dominates():
  """A label most live latents track still gets a full null of unrelated latents, where one
  exists; a label with fewer unrelated live latents than a 5% test needs is not tested."""
  classes = ("eos", "close")
  expected = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
  n_f = 100
  rng = np.random.default_rng(3)
  corr = rng.uniform(-0.3, 0.3, (n_f, 2))
  corr[:70, 0] = 0.8  # 70 latents track a: 30 unrelated ones remain
  corr[:85, 1] = 0.7  # 85 track b: 15 remain, fewer than 19
  corr[0, 0] = 0.95  # the strongest pair, (0, a)
  shifts = rng.normal(0, 1e-3, (n_f, 2))
  shifts[0] = [0.5, 0.0]
  out = causality.score_pairs(corr, ("a", "b"), expected, classes,
                              lambda f: (shifts[f], [{} for _ in f]), max_pairs=1,
                              null_latents=24)
  null_a = out["null"]["per_label"]["a"]
  assert len(null_a) == 24 and all(j >= 70 for j in null_a)
  assert list(out["null"]["per_label"]) == ["a"]
  pair, = out["pairs"]
  assert (pair["latent"], pair["label"], pair["n_null"]) == (0, "a", 24)
  assert pair["as_predicted"] and pair["p_value"] == pytest.approx(1 / 25)
  assert (out["n_strong"], out["n_null_too_small"], out["n_testable"], out["n_tested"]) == (
      155, 85, 70, 1)


def test_random_latents_pass_at_the_nominal_rate():
  """Latents whose correlation with a label is unrelated to their effect (random shifts, random
  correlation signs) pass the null at the nominal rate.

  A pair exchangeable with its n null latents passes with probability ⌊0.05(n + 1)⌋ / (n + 1)
  (5/100 at n = 99: the test is exact up to discreteness, never above 5%). Pairs of one call
  share the null sample, so their passes are correlated: given the null, a pair passes with
  probability about Beta(5, 95) (its 95% quantile's upper tail), SD 0.022. Over R calls of m
  pairs, the pass rate's SD is √(0.022²/R + 0.05·0.95/(R·m)); the check allows 4 of them."""
  classes = ("eos", "close", "close0")
  expected = {"a": np.array([1.0, -1.0, 0.0]), "b": np.array([0.0, 0.5, -1.0])}
  reps, n_f, m = 200, 140, 20
  passed, nominal = [], []
  for r in range(reps):
    rng = np.random.default_rng(100 + r)
    shifts = rng.normal(0, 1.0, (n_f, 3))
    corr = rng.uniform(-0.2, 0.2, (n_f, 2))
    strong = rng.choice(n_f, m, replace=False)  # m random latents, strongly "correlated"
    corr[strong, rng.integers(0, 2, m)] = rng.choice([-1, 1], m) * rng.uniform(0.6, 0.9, m)
    out = causality.score_pairs(corr, ("a", "b"), expected, classes,
                                lambda f, s=shifts: (s[f], [{} for _ in f]), max_pairs=m,
                                null_latents=99, seed=r)
    assert out["n_tested"] == m
    passed += [p["as_predicted"] for p in out["pairs"]]
    nominal += [np.floor(0.05 * (p["n_null"] + 1) + 1e-9) / (p["n_null"] + 1)
                for p in out["pairs"]]
  sd = np.sqrt(0.022 ** 2 / reps + 0.05 * 0.95 / (reps * m))
  assert 0.04 <= np.mean(nominal) <= 0.05 + 1e-12
  assert abs(np.mean(passed) - np.mean(nominal)) <= 4 * sd, (np.mean(passed), np.mean(nominal))


# ------------------------------------------------------------------------------------------------
# Validation.


def test_bad_inputs_raise_clear_errors(lm, data):
  with pytest.raises(ValueError, match="one name per column"):
    causality.score_pairs(np.zeros((4, 2)), ("a",), {}, ("eos",), lambda f: None)
  with pytest.raises(ValueError, match="threshold=0"):
    causality.score_pairs(np.zeros((4, 1)), ("a",), {}, ("eos",), lambda f: None, threshold=0)
  with pytest.raises(ValueError, match="null_latents"):
    causality.score_pairs(np.zeros((4, 1)), ("a",), {}, ("eos",), lambda f: None,
                          null_latents=-1)
  with pytest.raises(ValueError, match="same tokens"):
    causality.pearson(np.zeros((5, 2)), np.zeros((4, 3)))
  config, params = _planted(lm, 1)
  names, _ = causality.label_columns(DYCK, data.tokens)
  call = lambda corr, site="ln_final", **kw: causality.causal_predictability(
      causality.SplicedSAE(lm, MC, site, params, config, sae_lib.default_hparams(config)),
      data.tokens, data.sentence_mask, DYCK, corr, names, causality.CausalSettings(**kw))
  with pytest.raises(ValueError, match=r"expected \[F=16, K="):
    call(np.zeros((8, len(names))))
  with pytest.raises(ValueError, match="not a site"):
    call(np.zeros((16, len(names))), site="resid_post.3")
  with pytest.raises(ValueError, match="high_quantile in"):
    call(np.zeros((16, len(names))), high_quantile=1.5)

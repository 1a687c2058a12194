"""Tests for jaxsae.analysis.interventions / effects / intervened_generation: no-op identities,
batching, outcome measures against NumPy, token classes, quantiles, generation under
interventions (a planted latent), and input validation. (Causal predictability: causality_test.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from jaxsae import grammars
from jaxsae.analysis import effects
from jaxsae.analysis import intervened_generation as ig
from jaxsae.analysis import interventions as iv
from jaxsae.grammars import token_classes
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import model as model_lib

DYCK, MC = fakes.DYCK, fakes.TINY_DYCK_MC
SITE = "resid_post.0"
SAE = sae_lib.SAEConfig(d_in=32, width=64)
HP = sae_lib.default_hparams(SAE)
DEAD = 0  # planted: never fires


lm, data = fakes.TINY_DYCK_LM_FIXTURE, fakes.DYCK_BATCH_FIXTURE


def _sae(key, config=SAE):
  params = sae_lib.init(jax.random.key(key), config)
  if "b_enc" in params:
    params["b_enc"] = params["b_enc"].at[DEAD].set(-100.0)
  return params


@pytest.fixture(scope="module")
def sae():
  return _sae(1)


def _plain(lm, sae_params, tokens, config=SAE, mode="corrected", site=SITE):
  fn = sae_lib.splice_fn(sae_params, config, sae_lib.default_hparams(config), mode=mode)
  return model_lib.apply(lm, tokens, MC, replace={site: fn}).logits


def _logits(lm, sae_params, tokens, intervention, config=SAE, mode="corrected", site=SITE):
  return iv.intervened_logits(lm, MC, site, sae_params, config, sae_lib.default_hparams(config),
                              tokens, intervention, mode)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _codes(lm, sae_params, tokens):
  return np.asarray(iv.site_codes(lm, MC, SITE, sae_params, SAE, HP, tokens))


# ------------------------------------------------------------------------------------------------
# No-op identities and their non-trivial counterparts.


def test_clamp_to_own_value_is_noop_and_other_values_act_causally(lm, sae, data):
  tokens = data.tokens
  codes = _codes(lm, sae, tokens)
  b, t = 0, 9
  j = int(np.argmax(codes[b, t]))
  assert codes[b, t, j] > 0
  pos = np.zeros(tokens.shape, bool)
  pos[b, t] = True
  plain = _plain(lm, sae, tokens)
  _close(_logits(lm, sae, tokens, iv.clamp(j, codes[b, t, j], pos)), plain)
  moved = np.asarray(_logits(lm, sae, tokens, iv.clamp(j, codes[b, t, j] + 5.0, pos)))
  diff = np.abs(moved - np.asarray(plain)).max(-1)
  assert diff[b, t] > 1e-3  # the edited position changes; downstream of the last residual is
  diff[b, t] = 0.0  # per token, so no other position does
  assert diff.max() < 1e-6


@pytest.mark.parametrize("config, mode", [
    (SAE, "corrected"),
    (sae_lib.SAEConfig(d_in=32, width=64, input_norm=True, recon_norm=True), "original"),
    (sae_lib.SAEConfig(d_in=32, width=64, activation="topk", k_max=8, pre_bias=True,
                       decoder_norm="none", input_norm=True, recon_norm=True), "corrected"),
])
def test_keep_all_equals_plain_splice(lm, data, config, mode):
  params = _sae(3, config)
  plain = _plain(lm, params, data.tokens, config, mode)
  keep_all = iv.keep_only(jnp.ones((config.width,), bool))
  _close(_logits(lm, params, data.tokens, keep_all, config, mode), plain)
  _close(_logits(lm, params, data.tokens, None, config, mode), plain)
  # Keeping half the latents is not the plain splice.
  half = iv.keep_only(jnp.arange(config.width) % 2 == 0)
  assert np.abs(np.asarray(_logits(lm, params, data.tokens, half, config, mode))
                - np.asarray(plain)).max() > 1e-4


def test_patch_from_itself_is_noop_and_patch_all_from_source_is_its_splice(lm, sae, data):
  tokens = data.tokens
  some = iv.latent_mask([1, 2, 3, 10, 40], SAE.width)
  _close(_logits(lm, sae, tokens, iv.patch(some, tokens)), _plain(lm, sae, tokens))
  source = grammars.sample(jax.random.key(7), DYCK, 8, 32).tokens
  # The site is the last residual of a 1-layer model: downstream is per token, so patching every
  # latent at every position from the source gives the source's own spliced logits.
  every = iv.patch(jnp.ones((SAE.width,), bool), source)
  _close(_logits(lm, sae, tokens, every), _plain(lm, sae, source))
  # Codes as the source: the same.
  codes = iv.site_codes(lm, MC, SITE, sae, SAE, HP, source)
  _close(_logits(lm, sae, tokens, iv.patch(jnp.ones((SAE.width,), bool), codes)),
         _plain(lm, sae, source))


def test_zero_ablation_of_dead_latent_is_noop_of_active_latent_is_not(lm, sae, data):
  tokens = data.tokens
  codes = _codes(lm, sae, tokens)
  assert codes[..., DEAD].max() == 0
  plain = _plain(lm, sae, tokens)
  _close(_logits(lm, sae, tokens, iv.zero(DEAD)), plain)
  active = int(np.argmax((codes > 0).mean((0, 1))))
  assert np.abs(np.asarray(_logits(lm, sae, tokens, iv.zero(active))) -
                np.asarray(plain)).max() > 1e-4


def test_edit_codes_against_numpy():
  rng = np.random.default_rng(0)
  codes = rng.random((2, 3, 5)).astype(np.float32)
  pos = rng.random((2, 3)) < 0.5
  mask = np.array([1, 0, 1, 0, 0], bool)
  want = codes.copy()
  want[pos] = np.where(mask, 7.0, codes[pos])
  _close(iv.edit_codes(jnp.asarray(codes), iv.clamp(mask, 7.0, pos)), want)
  want = codes.copy()
  want[pos] = np.where(mask, codes[pos], 0.0)
  _close(iv.edit_codes(jnp.asarray(codes), iv.keep_only(mask, pos)), want)
  want = codes.copy()
  want[..., 3] = 0.0
  _close(iv.edit_codes(jnp.asarray(codes), iv.zero(3)), want)


# ------------------------------------------------------------------------------------------------
# Batching.


def test_latent_batch_equals_one_by_one(lm, sae, data):
  tokens = data.tokens
  pos = np.asarray(data.sentence_mask)
  latents = np.array([1, 5, 9, 33])
  values = np.array([0.0, 2.0, 0.5, 3.0], np.float32)
  batched = iv.intervened_logits_latents(lm, MC, SITE, sae, SAE, HP, tokens,
                                         iv.clamp(0, 0.0, pos), latents, values)
  assert batched.shape == (4, *tokens.shape, MC.vocab_size)
  for i, (j, v) in enumerate(zip(latents, values)):
    _close(batched[i], _logits(lm, sae, tokens, iv.clamp(int(j), v, pos)))
  masks = np.stack([np.arange(SAE.width) < 10, np.arange(SAE.width) >= 30])
  batched = iv.intervened_logits_latents(lm, MC, SITE, sae, SAE, HP, tokens,
                                         iv.zero(0), masks)
  for i in range(2):
    _close(batched[i], _logits(lm, sae, tokens, iv.zero(masks[i])))


def test_variant_batch_equals_one_by_one(lm, data):
  tokens = data.tokens
  params = [_sae(10 + i) for i in range(3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *params)
  hp_n = jax.tree.map(lambda x: jnp.stack([x] * 3), HP)
  shared = iv.zero(iv.latent_mask([4, 5, 6], SAE.width))
  out = iv.intervened_logits_variants(lm, MC, SITE, stacked, SAE, hp_n, tokens, shared)
  for i, p in enumerate(params):
    _close(out[i], _logits(lm, p, tokens, shared))
  own = iv.clamp(jnp.array([3, 8, 12]), jnp.array([1.0, 2.0, 3.0]))
  out = iv.intervened_logits_variants(lm, MC, SITE, stacked, SAE, hp_n, tokens, own,
                                      per_variant=True)
  for i, p in enumerate(params):
    _close(out[i], _logits(lm, p, tokens, iv.clamp(int(own.latents[i]), own.value[i])))


# ------------------------------------------------------------------------------------------------
# Outcome measures.


def test_effect_measures_against_numpy():
  rng = np.random.default_rng(1)
  base = rng.normal(size=(3, 4, 6)).astype(np.float32)
  edit = rng.normal(size=(3, 4, 6)).astype(np.float32)
  mask = rng.random((3, 4)) < 0.6
  member = rng.random((2, 6)) < 0.5
  got = effects.effect_measures(base, edit, mask, member)
  sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  pb, pe = sm(base.astype(np.float64)), sm(edit.astype(np.float64))
  kl = (pb * (np.log(pb) - np.log(pe))).sum(-1)[mask].mean()
  cls_b = np.stack([pb[mask][:, m].sum(-1).mean() for m in member])
  cls_e = np.stack([pe[mask][:, m].sum(-1).mean() for m in member])
  np.testing.assert_allclose(got["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(got["class_base"], cls_b, rtol=1e-5)
  np.testing.assert_allclose(got["class_shift"], cls_e - cls_b, rtol=1e-4, atol=1e-7)
  flips = (base.argmax(-1) != edit.argmax(-1))[mask].mean()
  np.testing.assert_allclose(got["top1_change"], flips, rtol=1e-6)


def test_intervention_effects_match_their_logits(lm, sae, data):
  tokens, mask = data.tokens, data.sentence_mask
  names, member = token_classes.token_classes(DYCK)
  latents, values = np.array([2, 6, 11]), np.array([3.0, 0.0, 1.0], np.float32)
  eff = effects.intervention_effects(lm, MC, SITE, sae, SAE, HP, tokens, iv.clamp(0, 0.0), mask,
                                member, latents_L=latents, values_L=values, chunk=2)
  clean = model_lib.apply(lm, tokens, MC).logits
  plain = _plain(lm, sae, tokens)
  for i, (j, v) in enumerate(zip(latents, values)):
    edited = _logits(lm, sae, tokens, iv.clamp(int(j), v))
    for base, key in ((clean, "vs_clean"), (plain, "vs_spliced")):
      ref = effects.effect_measures(base, edited, mask, member)
      for m in ("kl", "class_shift"):
        np.testing.assert_allclose(eff[key][m][i], ref[m], rtol=1e-4, atol=1e-6)
  ref = effects.effect_measures(clean, plain, mask, member)
  np.testing.assert_allclose(eff["spliced_vs_clean"]["kl"], ref["kl"], rtol=1e-5)
  assert float(eff["vs_spliced"]["kl"][0]) > 0


def test_token_classes():
  names, member = token_classes.token_classes(DYCK)
  vocab = DYCK.vocab
  got = {n: sorted(vocab[v] for v in np.nonzero(member[i])[0]) for i, n in enumerate(names)}
  assert got["eos"] == ["<eos>"] and got["close0"] == ["c0"] and got["close1"] == ["c1"]
  assert got["close"] == ["c0", "c1"] and got["open"] == ["o0", "o1"]
  expr = grammars.get("expr_prefix")
  names, member = token_classes.token_classes(expr)
  rows = dict(zip(names, member))
  for name, stem in (("digit", "dig"), ("un", "un"), ("bin", "bin"), ("tern", "tern")):
    assert [expr.vocab[v] for v in np.nonzero(rows[name])[0]] == [
        t for t in expr.vocab if t.rstrip("0123456789") == stem]
  np.testing.assert_array_equal(rows["op"], rows["un"] | rows["bin"] | rows["tern"])
  eng = grammars.get("english")
  names, member = token_classes.token_classes(eng)
  assert names == ("eos",) + eng.info.categories
  # Parts of speech partition the terminals; specials other than <eos> are in no class.
  np.testing.assert_array_equal(member[1:, :eng.n_terminals].sum(0), 1)
  assert member[:, eng.n_terminals:].sum() == 1
  for i, cat in enumerate(eng.info.categories):
    words = {eng.vocab[v].rstrip("0123456789") for v in np.nonzero(member[1 + i])[0]}
    assert len(words) == 1


def test_latent_quantiles_against_numpy():
  rng = np.random.default_rng(2)
  codes = np.maximum(rng.normal(size=(50, 4)), 0).astype(np.float32)
  codes[:, 3] = 0.0
  mask = rng.random(50) < 0.8
  got = np.asarray(iv.latent_quantiles(codes, [0.5, 0.95], mask_M=mask))
  for f in range(3):
    act = codes[mask, f][codes[mask, f] > 0]
    np.testing.assert_allclose(got[:, f], np.quantile(act, [0.5, 0.95]), rtol=1e-5)
  np.testing.assert_array_equal(got[:, 3], 0.0)
  got = np.asarray(iv.latent_quantiles(codes, [0.9], active_only=False))
  np.testing.assert_allclose(got[0], np.quantile(codes, 0.9, axis=0), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Generation.


GEN = dict(batch_size=16, max_new_tokens=20, temperature=2.0)


def _planted(lm, sign):
  return fakes.planted_eos_sae(lm["wte"], MC.d_model, DYCK.eos_id, sign)


def test_generation_stats_noop_equals_plain_spliced_generation(lm, sae):
  key = jax.random.key(9)
  noop = ig.generation_stats(lm, MC, DYCK, SITE, sae, SAE, HP, key, iv.zero(DEAD),
                             num_batches=2, return_tokens=True, **GEN)
  fn = sae_lib.splice_fn(sae, SAE, HP)
  ref = [generate_lib.generate(lm, MC, DYCK, jax.random.fold_in(key, i), replace={SITE: fn},
                               **GEN) for i in range(2)]
  ref_tokens = np.concatenate([np.asarray(g.tokens) for g in ref])
  np.testing.assert_array_equal(noop["tokens"], ref_tokens)
  gram = generate_lib.grammaticality(lm, MC, DYCK, key, num_batches=2, replace={SITE: fn}, **GEN)
  assert noop["grammatical"] == gram["mean"] and noop["finished"] == gram["finished"]
  np.testing.assert_allclose(noop["mean_length"], gram["mean_length"])
  new = ref_tokens[:, 7:]
  lengths = np.concatenate([np.asarray(g.lengths) for g in ref])
  n_c0 = sum((row[:n] == DYCK.token_id("c0")).sum() for row, n in zip(new, lengths))
  assert noop["class_counts"]["close0"] == pytest.approx(n_c0 / 32)


def test_generation_stats_default_budget_fills_the_context(lm, sae):
  kw = dict(num_batches=1, batch_size=4, return_tokens=True)
  key = jax.random.key(4)
  budget = MC.context - DYCK.prefix_len  # 57 < generate.MAX_NEW_TOKENS: the context decides
  assert budget < generate_lib.MAX_NEW_TOKENS
  default = ig.generation_stats(lm, MC, DYCK, SITE, sae, SAE, HP, key, **kw)
  explicit = ig.generation_stats(lm, MC, DYCK, SITE, sae, SAE, HP, key, max_new_tokens=budget,
                                 **kw)
  assert default["tokens"].shape == (4, MC.context)
  np.testing.assert_array_equal(default.pop("tokens"), explicit.pop("tokens"))
  assert default == explicit
  with pytest.raises(ValueError, match="context"):
    ig.generation_stats(lm, MC, DYCK, SITE, sae, SAE, HP, key,
                        max_new_tokens=generate_lib.MAX_NEW_TOKENS, **kw)


def test_generation_under_planted_clamp_stops_at_once(lm):
  config, params = _planted(lm, 1)
  hp = sae_lib.default_hparams(config)
  kw = dict(num_batches=1, batch_size=16, max_new_tokens=12, return_tokens=True)
  key = jax.random.key(3)
  run = lambda value, prompt: ig.generation_stats(
      lm, MC, DYCK, "ln_final", params, config, hp, key, iv.clamp(5, value),
      include_prompt=prompt, **kw)
  base = run(0.0, True)  # the <eos> latent off: sentences run on
  assert base["finished"] < 1 or base["mean_length"] > 0
  stop = run(100.0, True)
  assert stop["finished"] == 1.0 and stop["mean_length"] == 0.0 and stop["grammatical"] == 0.0
  # Generated positions only: the first token comes from the unedited prompt (the same as with
  # the latent off there), every later one is <eos> (or <pad> after it).
  later, later_off = run(100.0, False), run(0.0, False)
  np.testing.assert_array_equal(later["tokens"][:, 7], later_off["tokens"][:, 7])
  assert (later["tokens"][:, 7] != DYCK.eos_id).any()
  assert np.isin(later["tokens"][:, 8], [DYCK.eos_id, DYCK.pad_id]).all()
  assert later["finished"] == 1.0 and 0 < later["mean_length"] <= 1.0


def test_dyck_depth_statistic(lm, sae):
  stats = ig.generation_stats(lm, MC, DYCK, SITE, sae, SAE, HP, jax.random.key(1),
                              iv.zero(DEAD), num_batches=1, return_tokens=True, **GEN)
  new = stats["tokens"][:, 7:]
  depths = []
  for row in new:
    depth, best, done = 0, 0, False
    for tok in row:
      word = DYCK.vocab[tok]
      if word == "<eos>":
        done = True
        break
      depth += {"o": 1, "c": -1}.get(word[0], 0)  # specials inside a sentence: no change
      best = max(best, depth)
    if done:
      depths.append(best)
  assert depths and max(depths) > 0
  assert stats["max_depth_mean"] == pytest.approx(np.mean(depths))
  assert stats["max_depth_max"] == max(depths)


# ------------------------------------------------------------------------------------------------
# Validation.


def test_bad_inputs_raise_clear_errors(lm, sae, data):
  tokens = data.tokens
  with pytest.raises(ValueError, match="kind='scale' is unknown"):
    iv.Intervention(kind="scale", latents=jnp.int32(0), value=jnp.float32(0),
                    positions=jnp.asarray(True))
  with pytest.raises(ValueError, match="out of range"):
    _logits(lm, sae, tokens, iv.zero(SAE.width))
  with pytest.raises(ValueError, match="positions has shape"):
    _logits(lm, sae, tokens, iv.zero(1, np.ones((2, 3), bool)))
  with pytest.raises(ValueError, match="needs a source"):
    _logits(lm, sae, tokens, iv.Intervention(kind="patch", latents=jnp.int32(0),
                                             value=jnp.float32(0), positions=jnp.asarray(True)))
  with pytest.raises(ValueError, match="not a site"):
    _logits(lm, sae, tokens, iv.zero(1), site="resid_post.3")
  with pytest.raises(ValueError, match="positions=None"):
    ig.generation_stats(lm, MC, DYCK, SITE, sae, SAE, HP, jax.random.key(0),
                        iv.zero(1, np.ones(tokens.shape, bool)))

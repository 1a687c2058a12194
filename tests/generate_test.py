"""Tests for jaxsae.lm.generate: output format, determinism, replacement, grammaticality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import grammars
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import model as model_lib

DYCK = grammars.get("dyck2")
CONFIG = model_lib.ModelConfig(vocab_size=DYCK.vocab_size, n_layers=1, n_heads=2, d_model=32,
                               d_mlp=64, context=64)
MAX_NEW = 24


@pytest.fixture(scope="module")
def params():
  return model_lib.init(jax.random.key(0), CONFIG)


def _gen(params, key, **kwargs):
  kwargs.setdefault("batch_size", 32)
  kwargs.setdefault("max_new_tokens", MAX_NEW)
  return generate_lib.generate(params, CONFIG, DYCK, key, **kwargs)


def test_format_and_eos_cut(params):
  # Random init at a high temperature: many <eos> at random places, many tokens after them.
  gen = _gen(params, jax.random.key(1), temperature=3.0)
  toks = np.asarray(gen.tokens)
  assert toks.shape == (32, 7 + MAX_NEW) and toks.dtype == np.int32
  np.testing.assert_array_equal(toks[:, :7], np.broadcast_to(DYCK.decorator_ids, (32, 7)))
  new = toks[:, 7:]
  is_eos = new == DYCK.eos_id
  finished = np.asarray(gen.finished)
  np.testing.assert_array_equal(finished, is_eos.any(1))
  assert 0 < finished.sum() < 32  # the test exercises both cases
  first = np.where(finished, is_eos.argmax(1), MAX_NEW)
  np.testing.assert_array_equal(np.asarray(gen.lengths), first)
  for row, f in zip(new, first):
    assert (row[f + 1:] == DYCK.pad_id).all()  # everything after the first <eos> is <pad>
    assert DYCK.eos_id not in row[:f]


def test_greedy_is_deterministic_and_key_independent(params):
  a = _gen(params, jax.random.key(1), greedy=True)
  b = _gen(params, jax.random.key(2), greedy=True)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  # All rows share the prompt, so greedy rows are identical; they follow the argmax of apply.
  toks = np.asarray(a.tokens)
  assert (toks == toks[:1]).all()
  logits = model_lib.apply(params, a.tokens[:1], CONFIG).logits[0]
  n = int(a.lengths[0]) + (1 if bool(a.finished[0]) else 0)
  np.testing.assert_array_equal(toks[0, 7:7 + n], np.argmax(logits[6:6 + n], -1))


def test_sampling_depends_on_key_and_is_reproducible(params):
  a = _gen(params, jax.random.key(1))
  b = _gen(params, jax.random.key(1))
  c = _gen(params, jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_top_k_one_is_greedy(params):
  a = _gen(params, jax.random.key(3), top_k=1)
  b = _gen(params, jax.random.key(4), greedy=True)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_replacement_is_active_during_generation(params):
  # Steering the final residual towards <eos> makes every generation stop at once.
  direction = params["wte"][DYCK.eos_id] / jnp.sum(params["wte"][DYCK.eos_id] ** 2)
  replace = {"ln_final": lambda x: x + 100.0 * direction[None, None]}
  gen = _gen(params, jax.random.key(5), replace=replace)
  assert bool(gen.finished.all()) and int(gen.lengths.max()) == 0
  clean = _gen(params, jax.random.key(5))
  assert int(clean.lengths.max()) > 0


def test_replacement_with_traced_params_inside_jit(params):
  # The SAE use-case: the replacement closes over traced values; no recompilation per value.
  direction = params["wte"][DYCK.eos_id] / jnp.sum(params["wte"][DYCK.eos_id] ** 2)

  @jax.jit
  def lengths(strength):
    replace = {"ln_final": lambda x: x + strength * direction[None, None]}
    return _gen(params, jax.random.key(5), replace=replace).lengths

  assert int(lengths(100.0).max()) == 0
  assert int(lengths(0.0).max()) > 0


def _oracle_decoder(grammar, eos_bonus=3.0, close_bonus=1.0):
  """A hand-made perfect Dyck "model" in place of `decode.init_cache` / `decode.decode_step`.

  Its cache is the token prefix; its logits are -inf on every token `valid_next` forbids, with
  a preference for closing brackets and <eos>, and no opening bracket once the remaining
  budget is only enough to close the open ones (as a trained model learns the length limit).
  """
  def init_cache(config, batch_size, max_len):
    del config
    # One spare <pad> column: valid_next needs room for a sentence and <eos>.
    return {"tokens": jnp.full((batch_size, max_len + 1), grammar.pad_id, jnp.int32),
            "index": jnp.zeros((), jnp.int32)}

  def decode_step(params, cache, tokens_BT, config, *, replace=None, **unused):
    del params, config, replace, unused
    t = tokens_BT.shape[1]
    toks = jax.lax.dynamic_update_slice_in_dim(cache["tokens"], tokens_BT, cache["index"], 1)
    index = cache["index"] + t
    valid_BV = jax.lax.dynamic_index_in_dim(grammars.valid_next(grammar, toks), index - 1, 1,
                                            keepdims=False)
    pref = np.zeros(grammar.vocab_size, np.float32)
    pref[grammar.eos_id] = eos_bonus
    closers = [grammar.token_id("c0"), grammar.token_id("c1")]
    openers = [grammar.token_id("o0"), grammar.token_id("o1")]
    pref[closers] = close_bonus
    filled = jnp.arange(toks.shape[1])[None, :] < index
    depth_B = (jnp.sum(jnp.isin(toks, jnp.asarray(openers)) & filled, axis=1)
               - jnp.sum(jnp.isin(toks, jnp.asarray(closers)) & filled, axis=1))
    remaining = toks.shape[1] - 1 - index  # tokens still to generate, the next one included
    no_open_B = depth_B + 3 > remaining
    is_open_V = np.isin(np.arange(grammar.vocab_size), openers)
    allowed_BV = valid_BV & ~(no_open_B[:, None] & jnp.asarray(is_open_V)[None])
    allowed_BV = jnp.where(jnp.any(allowed_BV, axis=1, keepdims=True), allowed_BV, valid_BV)
    logits_BV = jnp.where(allowed_BV, jnp.asarray(pref)[None], -jnp.inf)
    return (model_lib.ForwardResult(logits=jnp.broadcast_to(logits_BV[:, None], (
        tokens_BT.shape[0], t, grammar.vocab_size)), acts={}),
            {"tokens": toks, "index": index})

  return init_cache, decode_step


def test_perfect_model_is_fully_grammatical(params, monkeypatch):
  init_cache, decode_step = _oracle_decoder(DYCK)
  monkeypatch.setattr(generate_lib.decode_lib, "init_cache", init_cache)
  monkeypatch.setattr(generate_lib.decode_lib, "decode_step", decode_step)
  # A replacement unique to this test keeps the oracle's compilation out of the others' cache.
  marker = {"resid_pre.0": lambda x: x}
  out = generate_lib.grammaticality(params, CONFIG, DYCK, jax.random.key(0), num_batches=2,
                                    batch_size=32, max_new_tokens=MAX_NEW, replace=marker)
  assert out["mean"] == 1.0 and out["std"] == 0.0 and out["per_batch"] == [1.0, 1.0]
  assert out["finished"] == 1.0 and out["mean_length"] > 2
  assert all(s.startswith("✓") for s in out["samples"])
  # The same oracle with the budget cut to 1 token cannot finish a sentence: all ungrammatical.
  short = generate_lib.grammaticality(params, CONFIG, DYCK, jax.random.key(0), num_batches=1,
                                      batch_size=32, max_new_tokens=1, replace=marker)
  assert short["mean"] == 0.0 and short["finished"] == 0.0


def test_random_init_is_almost_never_grammatical(params):
  out = generate_lib.grammaticality(params, CONFIG, DYCK, jax.random.key(0), num_batches=2,
                                    batch_size=32, max_new_tokens=MAX_NEW)
  assert set(out) >= {"mean", "std", "per_batch", "samples"}
  assert len(out["per_batch"]) == 2 and len(out["samples"]) == 8
  assert out["mean"] < 0.05
  assert out["std"] == pytest.approx(np.std(out["per_batch"]))


def test_argument_errors(params):
  with pytest.raises(ValueError, match="temperature"):
    _gen(params, jax.random.key(0), temperature=0.0)
  with pytest.raises(ValueError, match="context"):
    _gen(params, jax.random.key(0), max_new_tokens=CONFIG.context)
  with pytest.raises(ValueError, match="top_k"):
    _gen(params, jax.random.key(0), top_k=CONFIG.vocab_size + 1)
  with pytest.raises(ValueError, match="vocab"):
    generate_lib.generate(params, CONFIG, grammars.get("english"), jax.random.key(0))

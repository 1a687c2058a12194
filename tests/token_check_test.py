"""Token-array validation: fuzzed arrays for every language, the CKY parser as the reference.

Valid random arrays: the linear recognisers agree with the CKY parser (an independent algorithm
over the CNF tables). Invalid arrays (ids < 0 or >= V, int64 ids that would wrap modulo 2^32,
floats, bools, wrong rank, too short) raise at every public entry point, naming it; under
`jax.jit`, where values are unknown, ids outside the vocabulary are ungrammatical for both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import grammars
from jaxsae.grammars import cky
from jaxsae.grammars import cky_bool

T = 16  # the CKY tests' shape: chart size 8, shared compilations
LANGUAGES = ("dyck2", "dyck2_p03", "expr_prefix", "expr_postfix")
ENTRIES = {
    "is_grammatical": grammars.is_grammatical,
    "layout": grammars.layout,
    "labels": grammars.labels,
    "valid_next": grammars.valid_next,
    "parse": cky.parse,
    "recognise": cky_bool.recognise,
    "next_terminals": cky_bool.next_terminals,
    "well_formed": cky.well_formed,
}


def _fuzzed(g, seed: int, n: int = 48) -> np.ndarray:
  """Valid int32 [4n, T] rows: samples, mutated samples, random sentences, random junk."""
  rng = np.random.default_rng(seed)
  good = np.asarray(grammars.sample(jax.random.key(seed), g, n, max_len=T + 10).tokens)[:, :T]
  n_dec = g.prefix_len
  mutated = good.copy()
  for row in mutated:
    for _ in range(rng.integers(1, 3)):
      row[rng.integers(n_dec, T)] = rng.integers(0, g.n_terminals)
  sentences = np.full((n, T), g.pad_id, np.int32)
  sentences[:, :n_dec] = g.decorator_ids
  for row in sentences:
    length = rng.integers(1, T - n_dec)
    row[n_dec:n_dec + length] = rng.integers(0, g.n_terminals, length)
    row[n_dec + length] = g.eos_id
  junk = rng.integers(0, g.vocab_size, (n, T)).astype(np.int32)
  junk[: n // 2, :n_dec] = g.decorator_ids
  return np.concatenate([good, mutated, sentences, junk]).astype(np.int32)


@pytest.mark.parametrize("name", LANGUAGES)
def test_linear_recogniser_agrees_with_cky_on_fuzzed_arrays(name):
  g = grammars.get(name)
  toks = _fuzzed(g, seed=LANGUAGES.index(name))
  ours = np.asarray(grammars.is_grammatical(g, toks))
  ref = np.asarray(cky.parse(g, toks).grammatical)
  assert ref.sum() >= 48 and (~ref).sum() >= 48  # both verdicts well represented
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(np.asarray(jax.jit(grammars.is_grammatical)(g, toks)), ref)
  # The boolean CKY recogniser (English's path) gives the parser's verdicts, bucketed and jitted.
  np.testing.assert_array_equal(np.asarray(cky_bool.recognise(g, toks)), ref)
  np.testing.assert_array_equal(np.asarray(jax.jit(cky_bool.recognise)(g, toks)), ref)
  # Any integer dtype holding the same ids gives the same verdicts.
  np.testing.assert_array_equal(np.asarray(grammars.is_grammatical(g, toks.astype(np.uint8))),
                                ref)


def _with_bad_ids(g, toks, seed):
  """Rows of `toks` with one id per row replaced by one outside [0, V)."""
  rng = np.random.default_rng(seed)
  out = toks.astype(np.int64)
  rows = np.arange(len(out))
  pos = rng.integers(0, T, len(out))
  kind = rows % 3
  out[rows, pos] = np.where(kind == 0, -rng.integers(1, 2**31, len(out)),
                            np.where(kind == 1, rng.integers(g.vocab_size, 2**31, len(out)),
                                     # int64 ids that wrap modulo 2^32 to a valid id
                                     2**32 + out[rows, pos]))
  return out


@pytest.mark.parametrize("name", LANGUAGES + ("english",))
def test_every_entry_point_refuses_ids_outside_the_vocabulary(name):
  g = grammars.get(name)
  toks = np.asarray(grammars.sample(jax.random.key(3), g, 6, max_len=T + 10).tokens)[:, :T]
  if name == "english":  # the shortest English sentence needs longer rows
    toks = np.asarray(grammars.sample(jax.random.key(3), g, 6, max_len=40).tokens)
  bad = _with_bad_ids(g, toks, seed=4)
  for i in range(len(bad)):
    row = bad[i:i + 1]
    for entry, fn in ENTRIES.items():
      with pytest.raises(ValueError, match=rf"{entry}: token ids must lie in \[0, "
                                           rf"{g.vocab_size}\)"):
        fn(g, row)
      if np.all((row >= -2**31) & (row < 2**31)):  # representable as a jax int32 array
        with pytest.raises(ValueError, match="must lie in"):
          fn(g, jnp.asarray(row, jnp.int32))


def test_negative_ids_after_a_sentence_start_are_refused_not_judged():
  # The linear scans used to clip -1 to terminal 0 and call these grammatical.
  g = grammars.get("expr_postfix")
  toks = np.array(grammars.sample(jax.random.key(0), g, 16, max_len=T + 10).tokens)[:, :T]
  toks[:, g.prefix_len] = -1
  with pytest.raises(ValueError, match="found 16 outside it"):
    grammars.is_grammatical(g, toks)
  # Under jit (no values to check) they are not terminals: ungrammatical, as CKY says.
  assert not np.asarray(jax.jit(grammars.is_grammatical)(g, toks)).any()


@pytest.mark.parametrize("name", LANGUAGES)
def test_jitted_recognisers_judge_out_of_range_ids_ungrammatical(name):
  g = grammars.get(name)
  toks = _fuzzed(g, seed=7, n=8)
  bad = _with_bad_ids(g, toks, seed=8)
  bad = np.where((bad >= -2**31) & (bad < 2**31), bad, -1).astype(np.int32)  # int32 only
  linear = np.asarray(jax.jit(grammars.is_grammatical)(g, bad))
  ref = np.asarray(jax.jit(lambda g, t: cky.parse(g, t, max_sentence_len=8).grammatical)(g, bad))
  np.testing.assert_array_equal(linear, ref)
  rec = jax.jit(lambda g, t: cky_bool.recognise(g, t, max_sentence_len=8))(g, bad)
  np.testing.assert_array_equal(np.asarray(rec), ref)
  assert not linear.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, object])
def test_non_integer_ids_are_refused(dtype):
  g = grammars.get("dyck2")
  toks = _fuzzed(g, seed=0, n=4)
  for entry, fn in ENTRIES.items():
    with pytest.raises(TypeError, match=rf"{entry}: token ids must be integers"):
      fn(g, toks.astype(dtype))


def test_float_ids_are_refused_under_jit():
  g = grammars.get("expr_prefix")
  toks = jnp.asarray(_fuzzed(g, seed=0, n=4), jnp.float32)
  with pytest.raises(TypeError, match="must be integers"):
    jax.jit(grammars.is_grammatical)(g, toks)
  with pytest.raises(TypeError, match="must be integers"):
    jax.jit(cky.parse)(g, toks)


@pytest.mark.parametrize("name", LANGUAGES)
def test_wrong_rank_and_short_sequences_are_refused(name):
  g = grammars.get(name)
  toks = _fuzzed(g, seed=1, n=4)
  for entry, fn in ENTRIES.items():
    with pytest.raises(ValueError, match=rf"{entry}: .*rank 2.*tokens\[None\]"):
      fn(g, toks[0])
    with pytest.raises(ValueError, match=rf"{entry}: .*rank 2"):
      fn(g, toks[None])
    with pytest.raises(ValueError, match=rf"{entry}: .*too short"):
      fn(g, toks[:, :g.prefix_len])
  # Eight tokens hold a decorator and a one-token prefix: enough for prefix viability only.
  cky_bool.next_terminals(g, toks[:, :g.prefix_len + 1])
  with pytest.raises(ValueError, match="too short"):
    grammars.is_grammatical(g, toks[:, :g.prefix_len + 1])


def test_grammar_argument_is_checked():
  with pytest.raises(TypeError, match="expected a jaxsae.grammars Grammar"):
    grammars.is_grammatical("dyck2", np.zeros((1, T), np.int32))

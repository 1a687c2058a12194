"""Recognisers: exact verdicts on samples and on every single-token mutation of them."""

import jax
import numpy as np
import pytest

import reference_grammars as ref
from jaxsae import grammars
from jaxsae.grammars import cky

T = 40  # short sequences keep the exhaustive mutation sets small

SENTENCE_OK = {
    "dyck2": ref.dyck_ok,
    "expr_prefix": ref.expr_prefix_ok,
    "expr_postfix": ref.expr_postfix_ok,
}


def _mutations(tokens, vocab_size, pad_id):
  """Every single-token substitution, insertion and deletion up to one past <eos>."""
  out = []
  seq = list(tokens)
  end = min(len(seq), seq.index(pad_id) + 1 if pad_id in seq else len(seq))
  for i in range(end):
    for v in range(vocab_size):
      if v != seq[i]:
        s = seq.copy()
        s[i] = v
        out.append(s)
      out.append((seq[:i] + [v] + seq[i:])[: len(seq)])
    out.append(seq[:i] + seq[i + 1:] + [pad_id])
  return np.array(out, np.int32)


def _mutated_set(name, n_sentences=24, seed=0):
  g = grammars.get(name)
  batch = grammars.sample(jax.random.key(seed), g, n_sentences, max_len=T)
  toks = np.asarray(batch.tokens)
  return g, np.concatenate([toks] + [_mutations(row, g.vocab_size, g.pad_id) for row in toks])


@pytest.mark.parametrize("name", sorted(SENTENCE_OK))
def test_linear_recogniser_matches_reference_on_all_mutations(name):
  g, seqs = _mutated_set(name)
  ours = np.asarray(grammars.is_grammatical(g, seqs))
  expect = np.array([ref.full_sequence_ok(g.vocab, SENTENCE_OK[name], s) for s in seqs])
  assert expect.sum() > 24 and (~expect).sum() > 1000  # both verdicts well represented
  np.testing.assert_array_equal(ours, expect)


@pytest.mark.parametrize("name", sorted(SENTENCE_OK))
def test_cky_agrees_with_linear_recogniser(name):
  g, seqs = _mutated_set(name, n_sentences=8, seed=1)
  np.testing.assert_array_equal(np.asarray(cky.parse(g, seqs).grammatical),
                                np.asarray(grammars.is_grammatical(g, seqs)))


def test_english_verdicts_match_reference_on_mutations():
  g, seqs = _mutated_set("english", n_sentences=6, seed=2)
  rules = ref.read_rules(g.info.text)
  expect = np.array([ref.full_sequence_ok(g.vocab, lambda w: ref.pcfg_ok(rules, "S", w), s)
                     for s in seqs])
  np.testing.assert_array_equal(np.asarray(grammars.is_grammatical(g, seqs)), expect)


def _seq(g, words, eos=True, pad_to=T):
  ids = list(g.decorator_ids) + [g.token_id(w) for w in words] + ([g.eos_id] if eos else [])
  return ids + [g.pad_id] * (pad_to - len(ids))


@pytest.mark.parametrize("name, good", [("dyck2", ["o0", "c0"]), ("expr_prefix", ["dig3"]),
                                        ("expr_postfix", ["dig1", "dig2", "bin0"]),
                                        ("english", ["pro1", "verb2"])])
def test_format_rules(name, good):
  g = grammars.get(name)
  ok = _seq(g, good)
  no_eos = _seq(g, good, eos=False)
  empty = _seq(g, [])
  special_inside = _seq(g, good[:1] + ["<sep>"] + good[1:])
  junk_after = ok.copy()
  junk_after[len(g.decorator_ids) + len(good) + 1] = g.token_id(good[0])
  bad_decorator = ok.copy()
  bad_decorator[1] = g.token_id("<null>")
  seqs = np.array([ok, no_eos, empty, special_inside, junk_after, bad_decorator], np.int32)
  np.testing.assert_array_equal(np.asarray(grammars.is_grammatical(g, seqs)),
                                [True, False, False, False, False, False])


def test_jit_matches_eager():
  g, seqs = _mutated_set("dyck2", n_sentences=4)
  eager = grammars.is_grammatical(g, seqs)
  jitted = jax.jit(grammars.is_grammatical)(g, seqs)
  np.testing.assert_array_equal(eager, jitted)

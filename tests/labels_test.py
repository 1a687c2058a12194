"""Per-token labels and valid next tokens against independent Python references."""

import jax
import numpy as np
import pytest

import reference_grammars as ref
from jaxsae import grammars

T = 48


def _batch(name, n=64, seed=0):
  g = grammars.get(name)
  return g, np.asarray(grammars.sample(jax.random.key(seed), g, n, max_len=T).tokens)


def _words(g, row):
  return g.decode(row, sentence_only=True).split()


def test_dyck_labels_match_reference():
  g, toks = _batch("dyck2")
  lab = {k: np.asarray(v) for k, v in grammars.labels(g, toks).items()}
  assert set(lab) == set(grammars.label_info(g))
  for b, row in enumerate(toks):
    stack = []
    words = _words(g, row)
    partner = {}
    for i, w in enumerate(words):
      if w[0] == "o":
        stack.append(i)
      else:
        j = stack.pop()
        partner[i], partner[j] = j, i
    stack = []
    for i, w in enumerate(words):
      p = 7 + i
      assert lab["depth_before"][b, p] == len(stack)
      if w[0] == "o":
        stack.append(w[1:])
      else:
        assert stack.pop() == w[1:]
      assert lab["depth_after"][b, p] == len(stack)
      assert lab["is_open"][b, p] == (w[0] == "o")
      assert lab["bracket_type"][b, p] == int(w[1:])
      assert lab["top_type_after"][b, p] == (int(stack[-1]) if stack else -1)
      assert lab["stack_empty_after"][b, p] == (not stack)
      assert lab["match_distance"][b, p] == abs(partner[i] - i)
    outside = np.ones(T, bool)
    outside[7:7 + len(words)] = False
    for v in lab.values():
      assert (v[b, outside] == -1).all()


@pytest.mark.parametrize("name", ["expr_prefix", "expr_postfix"])
def test_expr_labels_match_reference(name):
  g, toks = _batch(name, seed=1)
  lab = {k: np.asarray(v) for k, v in grammars.labels(g, toks).items()}
  postfix = name == "expr_postfix"
  arity = {"dig": 0, "un": 1, "bin": 2, "tern": 3}
  for b, row in enumerate(toks):
    words = _words(g, row)
    tree = ref.expr_tree_labels(words, postfix)
    count = 1 if not postfix else 0
    for i, w in enumerate(words):
      p = 7 + i
      a = arity[w.rstrip("0123456789")]
      count += (a - 1) if not postfix else (1 - a)
      assert lab["token_class"][b, p] == a and lab["arity"][b, p] == a
      assert lab["pending_operands"][b, p] == count
      assert lab["eos_legal"][b, p] == (count == (0 if not postfix else 1))
      assert (lab["depth"][b, p], lab["arg_slot"][b, p], lab["parent_class"][b, p]) == tree[i]


def test_english_labels_on_hand_parsed_sentences():
  g = grammars.get("english")
  # The parse is unique: S -> NP VP, NP -> NP Conj NP, VP -> VP Conj VP with VP -> VP Adv.
  words = "pro0 conj1 adj2 noun3 verb4 adv7 conj5 verb6".split()
  seq = list(g.decorator_ids) + [g.token_id(w) for w in words] + [g.eos_id]
  seq += [g.pad_id] * (T - len(seq))
  lab = {k: np.asarray(v)[0, 7:7 + len(words)] for k, v in grammars.labels(g, [seq]).items()}
  # pos classes: N V Adj Pro Adv Conj
  np.testing.assert_array_equal(lab["pos"], [3, 5, 2, 0, 1, 4, 5, 1])
  np.testing.assert_array_equal(lab["in_subject"], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(lab["first_verb"], [-1, -1, -1, -1, 1, -1, -1, 0])
  np.testing.assert_array_equal(lab["conj_scope"], [-1, 0, -1, -1, -1, -1, 1, -1])
  np.testing.assert_array_equal(lab["eos_legal"], [0, 0, 0, 0, 1, 1, 0, 1])
  # Depth = nonterminal ancestors: pro0 under S NP NP Pro; verb4 under S VP VP VP V.
  np.testing.assert_array_equal(lab["depth"], [4, 3, 4, 4, 5, 4, 3, 4])


# --- valid next tokens ---------------------------------------------------------------------

def _viable_prefix(g, name, seq):
  """Reference: is this token sequence a prefix of some grammatical full sequence?"""
  toks = [g.vocab[t] for t in seq]
  n_dec = len(ref.DECORATOR)
  if tuple(toks[:n_dec]) != ref.DECORATOR[: len(toks[:n_dec])]:
    return False
  rest = toks[n_dec:]
  specials = set(ref.DECORATOR) | {"<pad>", "<eos>", "<sep>"}
  words = []
  for i, w in enumerate(rest):
    if w in specials:
      if w != "<eos>" or not _sentence_complete(name, words):
        return False
      return all(x == "<pad>" for x in rest[i + 1:])
    words.append(w)
  return _sentence_viable(name, words)


def _sentence_complete(name, words):
  return {"dyck2": ref.dyck_ok, "expr_prefix": ref.expr_prefix_ok,
          "expr_postfix": ref.expr_postfix_ok}[name](words)


def _sentence_viable(name, words):
  if name == "dyck2":  # no closer ever mismatches
    stack = []
    for w in words:
      if w[0] == "o":
        stack.append(w[1:])
      elif not stack or stack.pop() != w[1:]:
        return False
    return True
  arity = lambda w: {"dig": 0, "un": 1, "bin": 2, "tern": 3}[w.rstrip("0123456789")]
  if name == "expr_prefix":
    need = 1
    for w in words:
      if need == 0:
        return False
      need += arity(w) - 1
    return True
  have = 0
  for w in words:
    if have < arity(w):
      return False
    have += 1 - arity(w)
  return True


@pytest.mark.parametrize("name", ["dyck2", "expr_prefix", "expr_postfix"])
def test_valid_next_matches_brute_force(name):
  g = grammars.get(name)
  toks = np.asarray(grammars.sample(jax.random.key(5), g, 6, max_len=24).tokens)
  bad = toks.copy()
  bad[:, 9] = toks[:, 8]  # duplicated tokens: often ungrammatical prefixes
  bad[0, 2] = g.pad_id  # broken decorator
  seqs = np.concatenate([toks, bad])
  valid = np.asarray(grammars.valid_next(g, seqs))
  assert valid.shape == seqs.shape + (g.vocab_size,)
  for b, row in enumerate(seqs):
    for t in range(seqs.shape[1]):
      prefix = list(row[: t + 1])
      for v in range(g.vocab_size):
        assert valid[b, t, v] == _viable_prefix(g, name, prefix + [v]), (b, t, g.vocab[v])


def test_valid_next_contains_the_actual_next_token_of_grammatical_samples():
  for name in ("dyck2", "expr_prefix", "english"):
    g, toks = _batch(name, n=32, seed=3)
    valid = np.asarray(grammars.valid_next(g, toks))
    nxt = np.take_along_axis(valid[:, :-1], toks[:, 1:, None], axis=2)[..., 0]
    assert nxt.all(), name

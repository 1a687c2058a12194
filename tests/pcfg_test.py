"""Tests for grammar text parsing, validation, tables and the named grammars."""

import jax
import numpy as np
import pytest

from jaxsae import grammars
from jaxsae.grammars import library
from jaxsae.grammars import pcfg
from jaxsae.grammars import rules as rules_lib


@pytest.mark.parametrize("text, fragment", [
    ("S -> a b", "no probability"),
    ("S a [1.0]", "no '->'"),
    ("S -> a [x]", "'x' in rule for S is not a number"),
    ("S -> a [0.5] | b [0.4]", "probabilities of S sum to 0.9"),
    ("S -> a [1.2] | b [-0.2]", "probability 1.2"),
    ("S -> a [0.0] | b [1.0]", "probability 0"),
    ("S -> [1.0]", "empty right-hand side"),
    ("S -> a [0.5] | a [0.5]", "repeats line 1"),
    ("S -> a [1.0]\nT -> b [1.0]", "T (rule on line 2) is unreachable"),
    ("S -> a [0.5] | T [0.5]\nT -> T b [1.0]", "nonterminal T never terminates"),
    ("S -> S S [0.6] | a [0.4]", "S -> S S [0.6]"),
    ("S -> S S [0.5] | a [0.5]", "expected sentence length is infinite"),
    ("S -> 'T' [0.5] | T [0.5]\nT -> a [1.0]", "'T' is quoted"),
    ("S -> <eos> [1.0]", "collides with a special token"),
    ("| a [1.0]", "no rule precedes it"),
    ("", "no rules"),
    ("S -> 'a [1.0]", "line 1: the quote ' at ''a [1.0]' is never closed"),
    ('S -> a [0.5]\n | "b [0.5]', "line 2: the quote \" at"),
    ("S -> 'a [0.5] | b [0.5]", "never closed"),
                         ])
def test_bad_grammar_text_names_the_problem(text, fragment):
  with pytest.raises(grammars.GrammarError, match=None) as err:
    grammars.from_string(text)
  assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize("text", [b"S -> a [1.0]", None, 3, ["S -> a [1.0]"]])
def test_grammar_text_must_be_a_str(text):
  with pytest.raises(grammars.GrammarError, match="grammar text must be a str"):
    grammars.from_string(text)


def test_quotes_closed_on_their_line_and_quotes_in_comments_are_fine():
  g = grammars.from_string("S -> 'a' S [0.5] | \"b\" [0.5]  # it's a comment")
  assert g.info.terminals == ("a", "b")


def test_terminal_order_must_be_a_sequence_not_a_str():
  with pytest.raises(grammars.GrammarError, match="pass a sequence of terminal names"):
    grammars.from_string("S -> a [0.5] | b [0.5]", terminals="ab")


def test_terminal_order_must_cover_the_terminals():
  with pytest.raises(grammars.GrammarError, match="terminal order"):
    grammars.from_string("S -> a [0.5] | b [0.5]", terminals=["a"])
  g = grammars.from_string("S -> a [0.5] | b [0.5]", terminals=["b", "a"])
  assert g.vocab[:2] == ("b", "a")


def test_comments_continuations_and_quotes():
  g = grammars.from_string("""
      # a comment line
      S -> A 'b' [0.5]   # trailing comment
         | 'c' [0.5]
      A -> a [1.0]
  """)
  assert g.info.terminals == ("b", "c", "a")
  assert g.info.nonterminals == ("S", "A")
  assert abs(g.info.expected_length - 1.5) < 1e-12


@pytest.mark.parametrize("name, size, fixed", [
    ("dyck2", 13, {"o0": 0, "o1": 1, "c0": 2, "c1": 3, "<pad>": 4, "<sep>": 11, "Task0": 12}),
    ("expr_prefix", 28, {"dig0": 0, "dig9": 9, "un0": 10, "bin0": 13, "tern2": 18, "<pad>": 19,
                         "Task0": 27}),
    ("english", 69, {"noun0": 0, "verb0": 10, "adj0": 20, "pro0": 30, "adv0": 40, "conj9": 59,
                     "<pad>": 60, "Task:": 61, "<null>": 62, "Ops:": 63, "Out:": 64, "\n": 65,
                     "<eos>": 66, "<sep>": 67, "Task0": 68}),
                         ])
def test_vocabulary_matches_spec(name, size, fixed):
  g = grammars.get(name)
  assert g.vocab_size == size == len(g.vocab)
  for token, idx in fixed.items():
    assert g.token_id(token) == idx


def test_all_named_grammars_build():
  assert set(grammars.names()) == {
      "dyck2", "dyck2_p03", "expr_prefix", "expr_postfix", "english", "english_transitive",
      "english_relative", "english_prep", "english_pconj03"}
  for name in grammars.names():
    g = grammars.get(name)
    assert g.name == name
    assert grammars.get(name) is g  # cached: jit caches hit across calls


def test_expected_lengths_match_closed_forms():
  # Dyck: E_S = 0.6 E_S + 0.7 (2 + p E_S)  =>  E_S = 1.4 / (0.4 - 0.7 p).
  for p, name in ((0.5, "dyck2"), (0.3, "dyck2_p03")):
    assert grammars.get(name).info.expected_length == pytest.approx(1.4 / (0.4 - 0.7 * p))
  # Expr: E = 0.6 + 0.4 (1 + (0.33 + 0.66 + 1.02) E).
  assert grammars.get("expr_prefix").info.expected_length == pytest.approx(1 / (1 - 0.4 * 2.01))
  # English: E_NP = 3, E_VP = 2.05 / 0.45.
  assert grammars.get("english").info.expected_length == pytest.approx(3 + 2.05 / 0.45)
  # p_conj 0.3: E_NP = 10, E_VP = 30.
  assert grammars.get("english_pconj03").info.expected_length == pytest.approx(40.0)


def test_grammar_is_a_pytree_with_static_info():
  g = grammars.get("english")
  leaves, treedef = jax.tree.flatten(g)
  assert all(isinstance(x, np.ndarray) for x in leaves)
  g2 = jax.tree.unflatten(treedef, leaves)
  assert g2.info == g.info and hash(g2.info) == hash(g.info)
  n_t = jax.jit(lambda gr: gr.sampler.sym_kind_S.sum())(g)
  assert int(n_t) == int(np.asarray(g.sampler.sym_kind_S).sum())


def test_cnf_tables_are_consistent():
  for name in grammars.names():
    g = grammars.get(name)
    c = g.cnf
    n_c = len(g.info.cnf_names)
    assert c.lex_logp_CV.shape == (n_c, g.n_terminals)
    # Every terminal has a lexical parent; closures are reflexive with chain length 0.
    assert np.isfinite(c.lex_logp_CV).any(axis=0).all()
    np.testing.assert_array_equal(np.diag(c.unary_best_CC), 0.0)
    np.testing.assert_array_equal(np.diag(c.unary_len_CC), 0)
    assert (np.diag(c.unary_sum_CC) >= 0).all()  # log of (1 + cycles) >= 0
    # Probabilities of each original nonterminal's rules sum to one across the three tables.
    for a in range(len(g.info.nonterminals)):
      total = (np.exp(c.lex_logp_CV[a]).sum() + np.exp(c.bin_logp_R[c.bin_lhs_R == a]).sum())
      unary = [r for r in rules_lib.parse_rules(g.info.text)[0]
               if r.lhs == g.info.nonterminals[a] and len(r.rhs) == 1
               and r.rhs[0] in g.info.nonterminals]
      total += sum(r.prob for r in unary)
      assert total == pytest.approx(1.0, abs=1e-5), (name, g.info.nonterminals[a])


def test_decode():
  g = grammars.get("dyck2")
  toks = np.array(list(g.decorator_ids) + [0, 2, g.eos_id, g.pad_id, g.pad_id])
  assert g.decode(toks) == "Task: Task0 \\n Ops: <null> \\n Out: o0 c0 <eos>"
  assert g.decode(toks, sentence_only=True) == "o0 c0"
  assert g.decode(toks[None])[0] == g.decode(toks)


def test_dyck_builder_checks_p():
  with pytest.raises(grammars.GrammarError, match="p_nest"):
    library.dyck(1.5)


def test_canonical_text_round_trips():
  for name in grammars.names():
    g = grammars.get(name)
    again = pcfg.from_text(g.info.text, name=g.name, kind=g.kind, terminals=g.info.terminals)
    assert again.info == g.info
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(g)):
      np.testing.assert_array_equal(a, b)

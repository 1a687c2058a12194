"""CKY / inside parser and prefix viability against a pure-Python reference.

The reference works on the ORIGINAL rules (parsed from `grammar.info.text`, multi-symbol
right-hand sides, no CNF tables) with memoised top-down recursion keyed by the substring, so
the test compares two independent implementations: verdicts, total and best-parse
log-probabilities, the labels of the best parse (where it is unique), and prefix viability.
"""

from __future__ import annotations

import functools
import math
import random

import jax
import numpy as np
import pytest

from jaxsae.grammars import cky
from jaxsae.grammars import cky_bool
from jaxsae.grammars import library
from jaxsae.grammars import pcfg
from jaxsae.grammars import rules as rules_lib

# Sequence lengths, and the longest sentence each holds. Tests share compilations by sharing
# shapes: per-grammar tests use T (chart size 8, one loop phase), the bucketing tests T_MID
# (buckets 8 and 16), the long-sentence test T_LONG.
T, MAX_LEN = 16, 8
T_MID, MAX_LEN_MID = 24, 16
T_LONG, MAX_LEN_LONG = 48, 40
TIE_TOL = 1e-4  # best parses closer than this (in log-prob) count as tied: labels not compared


class Reference:
  """Recogniser, inside, Viterbi and prefix viability over a grammar's original rules."""

  def __init__(self, grammar: pcfg.Grammar):
    rules, _ = rules_lib.parse_rules(grammar.info.text)
    nonterminals = list(dict.fromkeys(r.lhs for r in rules))
    term_id = {t: i for i, t in enumerate(grammar.info.terminals)}
    # Terminals become their ids (int), nonterminals stay names (str).
    self.rules = {a: [] for a in nonterminals}
    for r in rules:
      rhs = tuple(s if s in self.rules else term_id[s] for s in r.rhs)
      self.rules[r.lhs].append((rhs, r.prob))
    self.start = nonterminals[0]
    self.nt_id = {a: grammar.info.cnf_names.index(a) for a in nonterminals}
    self.n_terminals = grammar.n_terminals

  def sample(self, rng: random.Random, max_len: int) -> tuple[int, ...] | None:
    """Draws a sentence; None when it would exceed `max_len` (every symbol yields >= 1)."""
    out, stack = [], [self.start]
    while stack:
      sym = stack.pop()
      if isinstance(sym, int):
        out.append(sym)
        continue
      alts = self.rules[sym]
      rhs = rng.choices([a[0] for a in alts], weights=[a[1] for a in alts])[0]
      stack.extend(reversed(rhs))
      if len(out) + len(stack) > max_len:
        return None
    return tuple(out)

  # --- exact derivations -----------------------------------------------------------------------
  @functools.lru_cache(maxsize=None)
  def inside(self, sym, s: tuple[int, ...]) -> float:
    """P(sym derives exactly s)."""
    if isinstance(sym, int):
      return 1.0 if s == (sym,) else 0.0
    return sum(p * self._seq_inside(rhs, s) for rhs, p in self.rules[sym])

  @functools.lru_cache(maxsize=None)
  def _seq_inside(self, rhs, s) -> float:
    if len(rhs) == 1:
      return self.inside(rhs[0], s)
    return sum(self.inside(rhs[0], s[:m]) * self._seq_inside(rhs[1:], s[m:])
               for m in range(1, len(s) - len(rhs) + 2))

  def derives(self, s) -> bool:
    return len(s) > 0 and self.inside(self.start, tuple(s)) > 0

  # --- best parse with tie detection -------------------------------------------------------------
  @staticmethod
  def _pick(cands):
    """Best of (score, tied, choice) candidates; tied if another is within TIE_TOL."""
    cands = [c for c in cands if c[0] > -math.inf]
    if not cands:
      return -math.inf, False, None
    cands.sort(key=lambda c: -c[0])
    score, tied, choice = cands[0]
    tied = tied or (len(cands) > 1 and cands[1][0] > score - TIE_TOL)
    return score, tied, choice

  @functools.lru_cache(maxsize=None)
  def best(self, sym, s):
    """(log-prob of the best derivation of s from sym, tied?, (rhs, child lengths))."""
    if isinstance(sym, int):
      return (0.0 if s == (sym,) else -math.inf), False, None
    cands = []
    for rhs, p in self.rules[sym]:
      score, tied, lengths = self._seq_best(rhs, s)
      cands.append((math.log(p) + score, tied, (rhs, lengths)))
    return self._pick(cands)

  @functools.lru_cache(maxsize=None)
  def _seq_best(self, rhs, s):
    if len(rhs) == 1:
      score, tied, _ = self.best(rhs[0], s)
      return score, tied, (len(s),)
    cands = []
    for m in range(1, len(s) - len(rhs) + 2):
      head, tail = self.best(rhs[0], s[:m]), self._seq_best(rhs[1:], s[m:])
      if head[0] > -math.inf and tail[0] > -math.inf:
        cands.append((head[0] + tail[0], head[1] or tail[1], (m,) + tail[2]))
    return self._pick(cands)

  def labels(self, s):
    """Per-token (depth, preterminal, parent, root_child) of the best parse of s (CNF ids)."""
    s = tuple(s)
    out = [None] * len(s)

    def walk(sym, i, sub, ancestors, root_child):
      rhs, lengths = self.best(sym, sub)[2]
      path = ancestors + [sym]
      if root_child is None and len(rhs) > 1:
        child_rc = [0] + [1] * (len(rhs) - 1)
      else:
        child_rc = [root_child] * len(rhs)
      k = 0
      for child, length, rc in zip(rhs, lengths, child_rc):
        if isinstance(child, int):
          pre = self.nt_id[sym] if len(rhs) == 1 else -1
          above = (ancestors[-1] if ancestors else None) if len(rhs) == 1 else sym
          out[i + k] = (len(path), pre, self.nt_id[above] if above else -1, rc or 0)
        else:
          walk(child, i + k, sub[k:k + length], path, rc)
        k += length

    walk(self.start, 0, s, [], None)
    return out

  # --- prefixes ----------------------------------------------------------------------------------
  @functools.lru_cache(maxsize=None)
  def _prefix_of(self, s) -> frozenset:
    """Nonterminals that derive some string beginning with s (s non-empty).

    Left recursion (S -> S S, NP -> NP Conj NP) revisits the same s, so this is a least
    fixpoint over all nonterminals at once; shorter suffixes are memoised.
    """
    found: set[str] = set()
    changed = True
    while changed:
      changed = False
      for a, alts in self.rules.items():
        if a not in found and any(self._seq_prefix(rhs, s, found) for rhs, _ in alts):
          found.add(a)
          changed = True
    return frozenset(found)

  def _seq_prefix(self, rhs, s, found_here=None) -> bool:
    """rhs derives a string beginning with s; `found_here` answers for s itself in a fixpoint."""
    head = rhs[0]
    if isinstance(head, int):
      if s[0] != head:
        return False
      return len(s) == 1 or (len(rhs) > 1 and self._seq_prefix_memo(rhs[1:], s[1:]))
    covers = head in (found_here if found_here is not None else self._prefix_of(s))
    return covers or (len(rhs) > 1 and any(
        self.inside(head, s[:m]) > 0 and self._seq_prefix_memo(rhs[1:], s[m:])
        for m in range(1, len(s))))

  @functools.lru_cache(maxsize=None)
  def _seq_prefix_memo(self, rhs, s) -> bool:
    return self._seq_prefix(rhs, s)

  def viable(self, s) -> bool:
    """s is a prefix of some sentence (the empty prefix always is)."""
    return not s or self.start in self._prefix_of(tuple(s))


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> Reference:
  return Reference(library.get(name))


def _sequence(g: pcfg.Grammar, sentence, t: int) -> list[int]:
  ids = list(g.decorator_ids) + list(sentence) + [g.eos_id]
  assert len(ids) <= t
  return ids + [g.pad_id] * (t - len(ids))


def _samples(ref: Reference, n: int, max_len: int, seed: int) -> list[tuple[int, ...]]:
  rng = random.Random(seed)
  out = []
  while len(out) < n:
    s = ref.sample(rng, max_len)
    if s is not None:
      out.append(s)
  return out


def _mutations(sentence, n_terminals: int) -> list[tuple[int, ...]]:
  """Every single-token substitution (by every other terminal), insertion and deletion."""
  s = list(sentence)
  out = []
  for i in range(len(s) + 1):
    for v in range(n_terminals):
      if i < len(s) and v != s[i]:
        out.append(tuple(s[:i] + [v] + s[i + 1:]))
      out.append(tuple(s[:i] + [v] + s[i:]))
    if i < len(s):
      out.append(tuple(s[:i] + s[i + 1:]))
  return [m for m in out if len(m) <= MAX_LEN]


_parse_jit = jax.jit(cky.parse)
_next_jit = jax.jit(cky_bool.next_terminals, static_argnames=("max_sentence_len",))


def _pad_rows(g, tokens, rows):
  assert len(tokens) <= rows
  filler = np.full((rows - len(tokens), tokens.shape[1]), g.pad_id, np.int32)
  return np.concatenate([tokens, filler])


def _parse_whole(g, tokens, rows=1024):
  """`cky.parse` under jit: one chart for the whole batch (no bucketing).

  Batches are padded to a fixed number of rows so that tests share compilations.
  """
  result = _parse_jit(g, _pad_rows(g, tokens, rows))
  return jax.tree.map(lambda x: np.asarray(x)[:len(tokens)], result)


def _next_whole(g, tokens, rows=16):
  """`cky_bool.next_terminals` under jit (chart size MAX_LEN), rows padded as in `_parse_whole`."""
  out = _next_jit(g, _pad_rows(g, tokens, rows), max_sentence_len=MAX_LEN)
  return [np.asarray(x)[:len(tokens)] for x in out]


def _check_against_reference(g, ref, sentences, result):
  """Compares a ParseResult row by row with the reference.

  Returns:
    How many rows had their labels compared (the others are ungrammatical or their best parse
    is tied).
  """
  n_dec = g.prefix_len
  res = jax.tree.map(np.asarray, result)
  compared = 0
  for row, s in enumerate(sentences):
    ok = ref.derives(s)
    assert res.grammatical[row] == ok, (g.name, g.decode(s))
    if not ok:
      assert res.logprob[row] == -np.inf and (res.depth[row] == -1).all()
      continue
    np.testing.assert_allclose(res.logprob[row], math.log(ref.inside(ref.start, s)), rtol=1e-4)
    best, tied, _ = ref.best(ref.start, s)
    np.testing.assert_allclose(res.viterbi_logprob[row], best, rtol=1e-4)
    assert res.logprob[row] >= res.viterbi_logprob[row] - 1e-4
    span = slice(n_dec, n_dec + len(s))
    assert (res.depth[row, :n_dec] == -1).all() and (res.depth[row, span.stop:] == -1).all()
    if not tied:
      expect = np.array(ref.labels(s)).T
      got = np.stack([res.depth[row, span], res.preterminal[row, span], res.parent[row, span],
                      res.root_child[row, span]])
      np.testing.assert_array_equal(got, expect, err_msg=f"{g.name}: {g.decode(s)}")
      compared += 1
  return compared


@pytest.mark.parametrize("name", library.names())
def test_parse_matches_reference_on_samples_and_mutations(name):
  g, ref = library.get(name), _reference(name)
  sampled = _samples(ref, 16, MAX_LEN, seed=0)
  short = sorted(sampled, key=len)[:2]
  mutated = [m for s in short for m in _mutations(s, g.n_terminals)]
  sentences = sampled + mutated
  tokens = np.array([_sequence(g, s, T) for s in sentences], np.int32)
  result = _parse_whole(g, tokens)
  assert result.grammatical[:len(sampled)].all()
  assert _check_against_reference(g, ref, sentences, result) >= 8
  # Mutations are mostly ungrammatical (in Dyck-2 every single one is).
  assert not result.grammatical[len(sampled):].all()
  # Same shapes again: no retrace.
  size = _parse_jit._cache_size()  # pylint: disable=protected-access
  _parse_whole(g, tokens[::-1].copy())
  assert _parse_jit._cache_size() == size  # pylint: disable=protected-access


def test_long_sentences():
  g, ref = library.get("english"), _reference("english")
  sentences = sorted(_samples(ref, 32, MAX_LEN_LONG, seed=3), key=len)[-8:]
  assert max(map(len, sentences)) > 24
  tokens = np.array([_sequence(g, s, T_LONG) for s in sentences], np.int32)
  _check_against_reference(g, ref, sentences, _parse_whole(g, tokens, rows=8))


def test_bucketed_equals_unbucketed():
  g, ref = library.get("english"), _reference("english")
  sentences = sorted(_samples(ref, 32, MAX_LEN_MID, seed=5), key=len)[::4]
  assert min(map(len, sentences)) <= 8 < max(map(len, sentences))  # both buckets
  tokens = np.array([_sequence(g, s, T_MID) for s in sentences], np.int32)
  bucketed = cky.parse(g, tokens)
  assert _check_against_reference(g, ref, sentences, bucketed) >= 4
  whole = _parse_whole(g, tokens)
  for a, b in zip(jax.tree.leaves(bucketed), jax.tree.leaves(whole)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6)
  # Repeated bucketed calls reuse the compiled buckets.
  size = cky._parse_core._cache_size()  # pylint: disable=protected-access
  cky.parse(g, tokens[::-1].copy())
  assert cky._parse_core._cache_size() == size  # pylint: disable=protected-access


def test_english_hand_checked_parses():
  g = library.get("english")
  names = g.info.cnf_names
  examples = {
      "pro3 verb2": ([3, 3], ["Pro", "V"], ["NP", "VP"], [0, 1]),
      "adj1 noun2 verb0": ([3, 3, 3], ["Adj", "N", "V"], ["NP", "NP", "VP"], [0, 0, 1]),
      "pro0 conj1 pro2 verb3": ([4, 3, 4, 3], ["Pro", "Conj", "Pro", "V"],
                                ["NP", "NP", "NP", "VP"], [0, 0, 0, 1]),
      "pro1 verb1 conj2 verb4": ([3, 4, 3, 4], ["Pro", "V", "Conj", "V"],
                                 ["NP", "VP", "VP", "VP"], [0, 1, 1, 1]),
      "adj0 noun1 verb2 pro3 adv4": ([3, 3, 4, 5, 3], ["Adj", "N", "V", "Pro", "Adv"],
                                     ["NP", "NP", "VP", "NP", "VP"], [0, 0, 1, 1, 1]),
  }
  tokens = np.array([_sequence(g, [g.token_id(w) for w in text.split()], T)
                     for text in examples], np.int32)
  res = jax.tree.map(np.asarray, cky.parse(g, tokens))
  assert res.grammatical.all()
  # log P("pro3 verb2") = log(1 * .25 * .1 * .25 * .1).
  np.testing.assert_allclose(res.logprob[0], math.log(0.25 * 0.1 * 0.25 * 0.1), rtol=1e-6)
  for row, (depth, pre, parent, rc) in enumerate(examples.values()):
    n = len(depth)
    span = slice(7, 7 + n)
    np.testing.assert_array_equal(res.depth[row, span], depth)
    np.testing.assert_array_equal(res.preterminal[row, span], [names.index(a) for a in pre])
    np.testing.assert_array_equal(res.parent[row, span], [names.index(a) for a in parent])
    np.testing.assert_array_equal(res.root_child[row, span], rc)
    for labels in (res.depth, res.preterminal, res.parent, res.root_child):
      assert (labels[row, :7] == -1).all() and (labels[row, 7 + n:] == -1).all()


def test_artificial_preterminals_in_dyck():
  g = library.get("dyck2")
  names = g.info.cnf_names
  o0, c0, o1, c1 = (g.token_id(w) for w in ("o0", "c0", "o1", "c1"))
  tokens = np.array([_sequence(g, [o0, o1, c1, c0], T)], np.int32)
  res = _parse_whole(g, tokens)
  # S -> Brack0 -> o0 S c0, S -> Brack1 -> o1 c1: brackets sit inside longer rules.
  np.testing.assert_array_equal(res.depth[0, 7:11], [2, 4, 4, 2])
  np.testing.assert_array_equal(res.preterminal[0, 7:11], [-1, -1, -1, -1])
  np.testing.assert_array_equal(
      res.parent[0, 7:11], [names.index(a) for a in ("Brack0", "Brack1", "Brack1", "Brack0")])
  np.testing.assert_array_equal(res.root_child[0, 7:11], [0, 1, 1, 1])


def test_format_rules():
  g = library.get("english")
  pro, verb = g.token_id("pro3"), g.token_id("verb2")
  good = _sequence(g, [pro, verb], T)
  cases = {"good": good}
  cases["no eos"] = good[:9] + [verb] * (T - 9)
  cases["empty sentence"] = _sequence(g, [], T)
  cases["special inside"] = _sequence(g, [pro, g.token_id("<sep>"), verb], T)
  cases["pad inside"] = _sequence(g, [pro, g.pad_id, verb], T)
  cases["non-pad after eos"] = good[:10] + [verb] + good[11:]
  cases["second eos"] = good[:11] + [g.eos_id] + good[12:]
  cases["wrong decorator"] = [g.token_id("Ops:")] + good[1:]
  cases["missing decorator"] = [pro, verb, g.eos_id] + [g.pad_id] * (T - 3)
  cases["eos in last slot"] = _sequence(g, [pro, verb] + [g.token_id("adv0")] * (MAX_LEN - 2), T)
  tokens = np.array(list(cases.values()), np.int32)
  expect = {k: k in ("good", "eos in last slot") for k in cases}
  for result in (cky.parse(g, tokens), _parse_whole(g, tokens)):
    assert dict(zip(cases, np.asarray(result.grammatical))) == expect
  ok, length = cky.well_formed(g, tokens)
  assert dict(zip(cases, np.asarray(ok))) == expect
  assert int(length[0]) == 2 and int(length[2]) == 0
  # Ids outside the vocabulary are refused; under jit (no values to check) they are no terminal.
  negative = np.array([_sequence(g, [pro, -1, verb], T)], np.int32)
  with pytest.raises(ValueError, match=r"parse: token ids must lie in \[0, "):
    cky.parse(g, negative)
  assert not _parse_whole(g, negative).grammatical.any()
  # A sentence longer than the chart is reported ungrammatical, not misparsed.
  short_chart = cky.parse(g, tokens, max_sentence_len=4)
  assert dict(zip(cases, np.asarray(short_chart.grammatical))) == {k: k == "good" for k in cases}


def _next_reference(g, ref, sentence, t):
  """Brute force: viable / next / complete at every position of the sequence."""
  viable = np.zeros((t,), bool)
  nxt = np.zeros((t, g.n_terminals), bool)
  complete = np.zeros((t,), bool)
  for p in range(-1, len(sentence)):
    prefix = tuple(sentence[:p + 1])
    if any(v < 0 or v >= g.n_terminals for v in prefix) or not ref.viable(prefix):
      break
    pos = g.prefix_len + p
    viable[pos] = True
    complete[pos] = ref.derives(prefix)
    nxt[pos] = [ref.viable(prefix + (v,)) for v in range(g.n_terminals)]
  return viable, nxt, complete


@pytest.mark.parametrize("name", library.names())
def test_next_terminals_match_brute_force(name):
  g, ref = library.get(name), _reference(name)
  sampled = sorted(_samples(ref, 8, MAX_LEN, seed=1), key=len)[-3:]
  # A mutation that breaks viability midway, and a sentence that runs on without <eos>.
  broken = next(m for m in _mutations(sampled[-1], g.n_terminals)
                if not ref.viable(m) and ref.viable(m[:len(m) // 2]))
  rows = [_sequence(g, s, T) for s in sampled + [broken]]
  rows.append(list(g.decorator_ids) + list((sampled[0] * T)[:MAX_LEN]) + [g.pad_id])
  tokens = np.array(rows, np.int32)
  viable, nxt, complete = _next_whole(g, tokens)
  for row, seq in enumerate(rows):
    end = seq.index(g.eos_id) if g.eos_id in seq else g.prefix_len + MAX_LEN
    expect = _next_reference(g, ref, seq[g.prefix_len:end], T)
    np.testing.assert_array_equal(viable[row], expect[0], err_msg=f"{name} row {row}")
    np.testing.assert_array_equal(complete[row], expect[2], err_msg=f"{name} row {row}")
    np.testing.assert_array_equal(nxt[row], expect[1], err_msg=f"{name} row {row}")
  # The empty prefix (at `Out:`) may start with exactly FIRST(S).
  first = np.asarray(g.cnf.class_terms_KV)[np.asarray(g.cnf.first_CK)[0]].any(axis=0)
  np.testing.assert_array_equal(nxt[0, g.prefix_len - 1], first)


def test_next_terminals_bucketed_equals_unbucketed_and_decorator():
  g, ref = library.get("english"), _reference("english")
  sentences = _samples(ref, 12, MAX_LEN, seed=4)
  tokens = np.array([_sequence(g, s, T) for s in sentences], np.int32)
  tokens[1, 0] = g.token_id("Ops:")  # a wrong decorator: nothing is viable
  bucketed = [np.asarray(x) for x in cky_bool.next_terminals(g, tokens, max_sentence_len=MAX_LEN)]
  whole = _next_whole(g, tokens)
  for a, b in zip(bucketed, whole):
    np.testing.assert_array_equal(a, b)
  assert not bucketed[0][1].any() and not bucketed[1][1].any()
  # A complete sentence is a viable prefix; its last position is complete.
  n = len(sentences[0])
  assert bucketed[0][0, 6:7 + n].all() and bucketed[2][0, 6 + n]


def test_unary_cycle_without_binary_rules_closed_form():
  # S => A => S => ... loops: P(S =>* a) = .5 / (1 - .25) = 2/3, P(S =>* b) = .25 / .75 = 1/3.
  g = pcfg.from_text("S -> A [0.5] | a [0.5]\nA -> S [0.5] | b [0.5]")
  a, b = g.token_id("a"), g.token_id("b")
  tokens = np.array([_sequence(g, s, T) for s in ([a], [b], [a, b])], np.int32)
  res = jax.tree.map(np.asarray, cky.parse(g, tokens))
  np.testing.assert_array_equal(res.grammatical, [True, True, False])
  np.testing.assert_allclose(np.exp(res.logprob[:2]), [2 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(np.exp(res.viterbi_logprob[:2]), [0.5, 0.25], rtol=1e-6)
  # Best parses S -> a and S -> A -> b.
  np.testing.assert_array_equal(res.depth[:2, 7], [1, 2])
  np.testing.assert_array_equal(res.preterminal[:2, 7], [0, 1])
  np.testing.assert_array_equal(res.parent[:2, 7], [-1, 0])
  viable, nxt, complete = (np.asarray(x) for x in cky_bool.next_terminals(g, tokens))
  np.testing.assert_array_equal(viable[:, 6:9], [[True, True, False]] * 3)
  np.testing.assert_array_equal(complete[:, 6:9], [[False, True, False]] * 3)
  np.testing.assert_array_equal(nxt[:, 6], True)
  assert not nxt[:, 7:].any()

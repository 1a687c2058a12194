"""Independent pure-Python references for the grammar tests (no JAX, no library tables).

Everything here is written from the spec alone, so the tests compare two implementations.
"""

from __future__ import annotations

import functools
import random

import numpy as np

DECORATOR = ("Task:", "Task0", "\n", "Ops:", "<null>", "\n", "Out:")


# ---------------------------------------------------------------------------------------------
# Rule text (independent parser: one rule per line, 'A -> x y [p] | z [q]').

def read_rules(text: str) -> dict[str, list[tuple[tuple[str, ...], float]]]:
  rules: dict[str, list] = {}
  for line in text.splitlines():
    if not line.strip():
      continue
    lhs, body = line.split("->")
    for alt in body.split("|"):
      syms, prob = alt.rsplit("[", 1)
      rules.setdefault(lhs.strip(), []).append((tuple(syms.split()), float(prob.rstrip("] "))))
  return rules


def recursive_sample(rules, start: str, rng: random.Random, limit: int) -> list[str] | None:
  """Straightforward recursive sampler; returns None when the sentence exceeds `limit`."""
  out: list[str] = []

  def expand(sym):
    if len(out) > limit:
      return
    if sym not in rules:
      out.append(sym)
      return
    alts = rules[sym]
    u, acc = rng.random(), 0.0
    for rhs, p in alts:
      acc += p
      if u < acc:
        break
    for s in rhs:
      expand(s)

  expand(start)
  return None if len(out) > limit else out


def exact_length_distribution(rules, start: str, n_max: int) -> np.ndarray:
  """P(sentence length = n) for n = 0..n_max, by fixed-point iteration on generating functions."""
  dist = {a: np.zeros(n_max + 1) for a in rules}
  unit = np.zeros(n_max + 1)
  unit[1] = 1.0
  for _ in range(2000):
    new = {a: np.zeros(n_max + 1) for a in rules}
    for a, alts in rules.items():
      for rhs, p in alts:
        d = np.zeros(n_max + 1)
        d[0] = 1.0
        for s in rhs:
          d = np.convolve(d, dist[s] if s in rules else unit)[: n_max + 1]
        new[a] += p * d
    delta = max(np.abs(new[a] - dist[a]).max() for a in rules)
    dist = new
    if delta < 1e-15:
      break
  return dist[start]


# ---------------------------------------------------------------------------------------------
# Sentence-level recognisers.

def dyck_ok(words: list[str]) -> bool:
  """Non-empty, balanced, properly nested o<k>/c<k> brackets (string reduction)."""
  if not words:
    return False
  s = list(words)
  changed = True
  while changed and s:
    changed = False
    for i in range(len(s) - 1):
      if s[i][0] == "o" and s[i + 1] == "c" + s[i][1:]:
        del s[i:i + 2]
        changed = True
        break
  return not s


def _arity(word: str) -> int | None:
  for stem, a in (("dig", 0), ("un", 1), ("bin", 2), ("tern", 3)):
    if word.startswith(stem) and word[len(stem):].isdigit():
      return a
  return None


def expr_prefix_ok(words: list[str]) -> bool:
  """Recursive descent: Expr := digit | op Expr^arity."""
  def parse(i):
    if i >= len(words) or _arity(words[i]) is None:
      return None
    j = i + 1
    for _ in range(_arity(words[i])):
      j = parse(j)
      if j is None:
        return None
    return j
  return bool(words) and parse(0) == len(words)


def expr_postfix_ok(words: list[str]) -> bool:
  """Postfix is prefix read backwards (with operands reversed)."""
  return expr_prefix_ok(list(reversed(words)))


def expr_tree_labels(words: list[str], postfix: bool) -> list[tuple[int, int, int]]:
  """(depth, operand slot 1..3 or 0 for the root, parent arity or 0) per word, by recursion."""
  seq = list(reversed(words)) if postfix else list(words)
  out: list = [None] * len(seq)

  def parse(i, depth, slot, parent):
    out[i] = (depth, slot, parent)
    a = _arity(seq[i])
    j = i + 1
    for k in range(a):
      s = (a - k) if postfix else (k + 1)
      j = parse(j, depth + 1, s, a)
    return j

  parse(0, 0, 0, 0)
  return list(reversed(out)) if postfix else out


def pcfg_ok(rules, start: str, words: list[str]) -> bool:
  """Memoised top-down recogniser over the original (non-normal-form) rules."""
  words = tuple(words)

  @functools.lru_cache(maxsize=None)
  def derives(sym, i, j):
    if sym not in rules:
      return j == i + 1 and words[i] == sym
    return any(seq_derives(rhs, i, j) for rhs, _ in rules[sym])

  @functools.lru_cache(maxsize=None)
  def seq_derives(rhs, i, j):
    if len(rhs) == 1:
      return derives(rhs[0], i, j)
    # Every symbol yields at least one word (no empty rules).
    return any(derives(rhs[0], i, k) and seq_derives(rhs[1:], k, j)
               for k in range(i + 1, j - len(rhs) + 2))

  return bool(words) and derives(start, 0, len(words))


def full_sequence_ok(vocab, words_ok, tokens) -> bool:
  """Spec format rules around a sentence-level recogniser."""
  toks = [vocab[t] for t in tokens]
  if tuple(toks[:7]) != DECORATOR or "<eos>" not in toks[7:]:
    return False
  e = toks.index("<eos>", 7)
  sentence = toks[7:e]
  specials = set(DECORATOR) | {"<pad>", "<eos>", "<sep>"}
  if any(w in specials for w in sentence) or any(w != "<pad>" for w in toks[e + 1:]):
    return False
  return words_ok(sentence)

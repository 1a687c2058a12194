"""Grammar text: parsing NLTK-style rules and checking them.

`parse_rules` turns rule text into `Rule`s (with their line numbers); `check_rules` checks them
(probabilities per left-hand side sum to 1, every nonterminal reachable and productive, ...)
and splits the symbols into nonterminals and terminals; `check_finite_length` checks that the
expected sentence length is finite. Every problem raises `GrammarError` naming the line, rule
or symbol and the fix. The grammar objects built from the checked rules live in `pcfg.py`.

Grammars are written in NLTK-style text::

    S      -> S S [0.3] | Brack0 [0.35] | Brack1 [0.35]
    Brack0 -> o0 S c0 [0.5] | o0 c0 [0.5]

A symbol is a nonterminal iff it appears on a left-hand side; every other symbol (and every
quoted one, 'x' or "x") is a terminal. The first left-hand side is the start symbol. Lines
starting with `|` continue the previous rule; `#` starts a comment.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Sequence

import numpy as np

_PROB_TOL = 1e-6
class GrammarError(ValueError):
  """A grammar text or specification is invalid; the message names the rule and the fix."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One production `lhs -> rhs [prob]`; `line` is its 1-based line in the source text."""

  lhs: str
  rhs: tuple[str, ...]
  prob: float
  line: int = 0

  def __str__(self) -> str:
    return f"{self.lhs} -> {' '.join(self.rhs)} [{self.prob!r}]"  # repr: text round-trips


# ------------------------------------------------------------------------------------------------
# Text parsing.

_PROB_RE = re.compile(r"\[\s*([^\]]*)\]\s*$")


_SYMBOL_RE = re.compile(r"'[^']*'|\"[^\"]*\"|[^\s'\"]+")


def _split_alternatives(body: str) -> list[str]:
  """Splits a right-hand side on `|` outside quotes."""
  parts, current, quote = [], [], None
  for ch in body:
    if quote:
      current.append(ch)
      if ch == quote:
        quote = None
    elif ch in "'\"":
      quote = ch
      current.append(ch)
    elif ch == "|":
      parts.append("".join(current))
      current = []
    else:
      current.append(ch)
  parts.append("".join(current))
  return parts


def _open_quote(line: str) -> int | None:
  """Column of a quote that is never closed on `line`, or None."""
  quote, start = None, None
  for i, ch in enumerate(line):
    if quote:
      if ch == quote:
        quote = None
    elif ch in "'\"":
      quote, start = ch, i
  return start if quote else None


def _strip_comment(line: str) -> str:
  """Drops a `#` comment that is outside quotes."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      if ch == quote:
        quote = None
    elif ch in "'\"":
      quote = ch
    elif ch == "#":
      return line[:i]
  return line


def parse_rules(text: str) -> tuple[list[Rule], set[str]]:
  """Parses NLTK-style PCFG text into rules (no semantic checks).

  Returns:
    The rules in source order and the set of symbols that were quoted (forced terminals).

  Raises:
    GrammarError: naming the line for malformed text, or when `text` is not a str.
  """
  if not isinstance(text, str):
    raise GrammarError(f"the grammar text must be a str, got {type(text).__name__}; pass the "
                       "rules as text, e.g. \"S -> 'a' S [0.5] | 'a' [0.5]\" (decode bytes "
                       "first)")
  logical: list[tuple[int, str]] = []
  for lineno, raw in enumerate(text.splitlines(), start=1):
    line = _strip_comment(raw).strip()
    if not line:
      continue
    col = _open_quote(line)
    if col is not None:
      raise GrammarError(
          f"line {lineno}: the quote {line[col]} at '{line[col:col + 12]}' is never closed; "
          f"close it on the same line (quoted terminals are written {line[col]}x{line[col]})")
    if line.startswith("|"):
      if not logical:
        raise GrammarError(f"line {lineno}: '{raw.strip()}' continues a rule but no rule precedes it")
      prev_no, prev = logical[-1]
      logical[-1] = (prev_no, prev + " " + line)
    else:
      logical.append((lineno, line))

  rules: list[Rule] = []
  quoted: set[str] = set()
  for lineno, line in logical:
    if "->" not in line:
      raise GrammarError(f"line {lineno}: '{line}' has no '->'; write rules as 'A -> B C [0.5] | d [0.5]'")
    lhs, body = line.split("->", 1)
    lhs = lhs.strip()
    if not re.fullmatch(r"[^\s'\"|\[\]]+", lhs):
      raise GrammarError(f"line {lineno}: left-hand side '{lhs}' must be a single unquoted symbol")
    for alt in _split_alternatives(body):
      alt = alt.strip()
      m = _PROB_RE.search(alt)
      if not m:
        raise GrammarError(
            f"line {lineno}: alternative '{alt}' of {lhs} has no probability; append one in "
            "brackets, e.g. 'A -> B C [0.5]'")
      try:
        prob = float(m.group(1))
      except ValueError:
        raise GrammarError(
            f"line {lineno}: '{m.group(1)}' in rule for {lhs} is not a number") from None
      symbols_text = alt[: m.start()].strip()
      symbols = []
      for tok in _SYMBOL_RE.findall(symbols_text):
        if tok[0] in "'\"":
          tok = tok[1:-1]
          if not tok:
            raise GrammarError(f"line {lineno}: empty quoted terminal in rule for {lhs}")
          quoted.add(tok)
        symbols.append(tok)
      if not symbols:
        raise GrammarError(
            f"line {lineno}: rule '{lhs} -> [{prob:g}]' has an empty right-hand side; empty "
            "rules are not supported (sentences are never empty): fold the empty alternative "
            "into the rules that use it")
      if not (0.0 < prob <= 1.0) or not math.isfinite(prob):
        raise GrammarError(
            f"line {lineno}: rule '{lhs} -> {symbols_text}' has probability {prob:g}; "
            "probabilities must lie in (0, 1] (delete rules of probability 0)")
      rules.append(Rule(lhs, tuple(symbols), prob, lineno))
  if not rules:
    raise GrammarError("the grammar text holds no rules; write at least 'S -> a [1.0]'")
  return rules, quoted


def check_rules(rules: Sequence[Rule], quoted: set[str],
                reserved: Sequence[str] = ()) -> tuple[list[str], list[str]]:
  """Semantic checks; returns (nonterminals with the start first, terminals by first use).

  Args:
    rules, quoted: from `parse_rules`.
    reserved: names no terminal may take (the vocabulary's special tokens, `pcfg.SPECIALS`).
  """
  nonterminals = list(dict.fromkeys(r.lhs for r in rules))
  nt_set = set(nonterminals)
  clash = nt_set & quoted
  if clash:
    name = sorted(clash)[0]
    raise GrammarError(
        f"symbol '{name}' is quoted (a terminal) somewhere but also has rules (a nonterminal); "
        "rename one of them")
  terminals = list(dict.fromkeys(s for r in rules for s in r.rhs if s not in nt_set))
  for t in terminals:
    if t in reserved:
      raise GrammarError(f"terminal '{t!r}' collides with a special token; rename it")

  by_lhs: dict[str, list[Rule]] = collections.defaultdict(list)
  for r in rules:
    by_lhs[r.lhs].append(r)
  for lhs, rs in by_lhs.items():
    seen = {}
    for r in rs:
      if r.rhs in seen:
        raise GrammarError(
            f"line {r.line}: rule '{lhs} -> {' '.join(r.rhs)}' repeats line {seen[r.rhs]}; "
            "merge the two into one alternative with the summed probability")
      seen[r.rhs] = r.line
    total = sum(r.prob for r in rs)
    if abs(total - 1.0) > _PROB_TOL:
      listing = " | ".join(f"{' '.join(r.rhs)} [{r.prob:g}]" for r in rs)
      raise GrammarError(
          f"line {rs[0].line}: probabilities of {lhs} sum to {total:.6g}, not 1: "
          f"{lhs} -> {listing}; rescale them")

  # Non-terminating symbols: cannot derive any terminal string.
  generating: set[str] = set()
  changed = True
  while changed:
    changed = False
    for r in rules:
      if r.lhs not in generating and all(s not in nt_set or s in generating for s in r.rhs):
        generating.add(r.lhs)
        changed = True
  dead = [a for a in nonterminals if a not in generating]
  if dead:
    a = dead[0]
    listing = "; ".join(str(r) + f" (line {r.line})" for r in by_lhs[a])
    raise GrammarError(
        f"nonterminal {a} never terminates: each of its rules needs a non-terminating symbol "
        f"({listing}); give it a rule that ends in terminals")

  # Unreachable symbols.
  reach = {nonterminals[0]}
  frontier = [nonterminals[0]]
  while frontier:
    a = frontier.pop()
    for r in by_lhs[a]:
      for s in r.rhs:
        if s in nt_set and s not in reach:
          reach.add(s)
          frontier.append(s)
  unreachable = [a for a in nonterminals if a not in reach]
  if unreachable:
    a = unreachable[0]
    raise GrammarError(
        f"nonterminal {a} (rule on line {by_lhs[a][0].line}) is unreachable from the start "
        f"symbol {nonterminals[0]}; use it in a rule or delete its rules")
  return nonterminals, terminals


def _mean_matrix(rules: Sequence[Rule], nonterminals: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """M[A,B] = expected count of B in one expansion of A; t[A] = expected terminal count."""
  idx = {a: i for i, a in enumerate(nonterminals)}
  n = len(nonterminals)
  m = np.zeros((n, n))
  t = np.zeros(n)
  for r in rules:
    for s in r.rhs:
      if s in idx:
        m[idx[r.lhs], idx[s]] += r.prob
      else:
        t[idx[r.lhs]] += r.prob
  return m, t


def check_finite_length(rules: Sequence[Rule], nonterminals: Sequence[str]) -> np.ndarray:
  """Returns expected yield lengths per nonterminal; raises if any is infinite."""
  m, t = _mean_matrix(rules, nonterminals)
  n = len(nonterminals)
  reach = (m > 0).astype(np.int64) + np.eye(n, dtype=np.int64)
  for _ in range(max(1, int(math.ceil(math.log2(max(n, 2)))) + 1)):
    reach = np.minimum(reach @ reach, 1)
  seen: set[int] = set()
  for i in range(n):
    if i in seen:
      continue
    scc = [j for j in range(n) if reach[i, j] and reach[j, i]]
    seen.update(scc)
    sub = m[np.ix_(scc, scc)]
    rho = float(np.max(np.abs(np.linalg.eigvals(sub)))) if sub.size else 0.0
    if rho >= 1.0 - 1e-9:
      names = {nonterminals[j] for j in scc}
      recursive = [str(r) for r in rules if r.lhs in names and any(s in names for s in r.rhs)]
      raise GrammarError(
          f"the expected sentence length is infinite: the recursion among "
          f"{{{', '.join(sorted(names))}}} has branching factor {rho:.4g} >= 1 "
          f"(rules: {'; '.join(recursive)}); lower the probabilities of these recursive rules")
  return np.linalg.solve(np.eye(n) - m, t)

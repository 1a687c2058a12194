"""Probabilistic context-free grammars as pytrees of rule tables.

A `Grammar` is a `flax.struct.dataclass` whose array leaves are the rule tables used on device
(sampler tables and a Chomsky-normal-form copy for the CKY parser) and whose static part
(`GrammarInfo`) holds the symbol names, vocabulary and kind. Pass a grammar to jitted functions
as an ordinary argument; two calls with the same grammar do not retrace.

Grammars are written in NLTK-style text (the syntax and its checks: `rules.py`); `from_text`
builds a grammar from it and raises `rules.GrammarError` naming the offending line, rule or
symbol.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

import flax.struct
import numpy as np

from jaxsae.grammars import rules as rules_lib

# Special tokens follow the grammar's terminals in this order; `Task0` comes last (spec).
SPECIALS = ("<pad>", "Task:", "<null>", "Ops:", "Out:", "\n", "<eos>", "<sep>", "Task0")
DECORATOR = ("Task:", "Task0", "\n", "Ops:", "<null>", "\n", "Out:")
KINDS = ("dyck", "expr_prefix", "expr_postfix", "pcfg")


# ------------------------------------------------------------------------------------------------
# Device tables.


@flax.struct.dataclass
class SamplerTables:
  """Rule tables for the stack sampler (see sampler.py), indexed by nonterminal id.

  Symbols are encoded as terminal token ids `0..n_terminals-1` followed by nonterminals
  `n_terminals + a`. Unary rules to non-preterminal nonterminals are folded into their parents,
  so every expansion either emits or branches.
  """

  rule_cum_AR: np.ndarray  # f32 [A, R] cumulative rule probability; +inf after the last rule
  rule_rhs_ARL: np.ndarray  # i32 [A, R, L] right-hand sides (symbols), -1 padded
  rule_len_AR: np.ndarray  # i32 [A, R]
  rule_dmin_AR: np.ndarray  # i32 [A, R] change of the minimum completed length
  sym_kind_S: np.ndarray  # i32 [S] 0 terminal, 1 preterminal (emits one word), 2 nonterminal
  min_yield_S: np.ndarray  # i32 [S] shortest yield of each symbol
  word_cum_AW: np.ndarray  # f32 [A, W] preterminal word cumulative probs; +inf after the last
  word_id_AW: np.ndarray  # i32 [A, W]


@flax.struct.dataclass
class CNFTables:
  """The grammar in Chomsky normal form with unary closures, for the CKY/inside parser.

  Nonterminal ids: the original ones first (same order as `GrammarInfo.nonterminals`), then
  artificial ones (binarisation intermediates and preterminals for terminals inside longer
  rules), which do not count as tree nodes when measuring depth.
  """

  lex_logp_CV: np.ndarray  # f32 [C, n_terminals] log P(C -> v), -inf where absent
  bin_lhs_R: np.ndarray  # i32 [R]
  bin_left_R: np.ndarray  # i32 [R]
  bin_right_R: np.ndarray  # i32 [R]
  bin_logp_R: np.ndarray  # f32 [R]
  unary_sum_CC: np.ndarray  # f32 [C, C] log of sum over unary chains A =>* B (diag includes 1)
  unary_best_CC: np.ndarray  # f32 [C, C] log prob of the best unary chain (0 on the diagonal)
  unary_len_CC: np.ndarray  # i32 [C, C] number of unary steps in that best chain
  unary_pred_CC: np.ndarray  # i32 [C, C] node just above B on that chain (-1 if A == B)
  artificial_C: np.ndarray  # bool [C]
  first_CK: np.ndarray  # bool [C, K] terminal classes that can begin a yield of C
  left_corner_CC: np.ndarray  # bool [C, C] reflexive-transitive left-corner relation
  term_class_V: np.ndarray  # i32 [n_terminals] terminal -> interchangeability class
  class_terms_KV: np.ndarray  # bool [K, n_terminals]


@dataclasses.dataclass(frozen=True)
class GrammarInfo:
  """Static (hashable) description of a grammar."""

  name: str
  kind: str
  text: str
  terminals: tuple[str, ...]
  nonterminals: tuple[str, ...]
  cnf_names: tuple[str, ...]
  categories: tuple[str, ...]  # preterminal nonterminals (parts of speech), in vocab order
  expected_length: float  # unconditional expected sentence length (before the length filter)
  min_length: int  # shortest sentence


@flax.struct.dataclass
class Grammar:
  """A PCFG: static `info` plus device rule tables. See module docstring."""

  info: GrammarInfo = flax.struct.field(pytree_node=False)
  sampler: SamplerTables
  cnf: CNFTables

  # --- vocabulary -----------------------------------------------------------------------------
  @property
  def name(self) -> str:
    return self.info.name

  @property
  def kind(self) -> str:
    return self.info.kind

  @property
  def n_terminals(self) -> int:
    return len(self.info.terminals)

  @property
  def vocab(self) -> tuple[str, ...]:
    """Token strings in id order: terminals, then the specials, then `Task0`."""
    return self.info.terminals + SPECIALS

  @property
  def vocab_size(self) -> int:
    return self.n_terminals + len(SPECIALS)

  def token_id(self, token: str) -> int:
    try:
      return self.vocab.index(token)
    except ValueError:
      raise KeyError(f"'{token}' is not in the vocabulary of grammar {self.name}") from None

  @property
  def pad_id(self) -> int:
    return self.token_id("<pad>")

  @property
  def eos_id(self) -> int:
    return self.token_id("<eos>")

  @property
  def decorator_ids(self) -> tuple[int, ...]:
    return tuple(self.token_id(t) for t in DECORATOR)

  @property
  def prefix_len(self) -> int:
    return len(DECORATOR)

  def decode(self, tokens, *, sentence_only: bool = False, keep_pad: bool = False):
    """Token ids → human-readable text. [T] gives a string, [B, T] a list of strings.

    Args:
      tokens: int array of shape [T] or [B, T].
      sentence_only: drop the decorator and everything from `<eos>` on.
      keep_pad: keep `<pad>` tokens (dropped by default).
    """
    arr = np.asarray(tokens)
    if arr.ndim == 2:
      return [self.decode(row, sentence_only=sentence_only, keep_pad=keep_pad) for row in arr]
    if arr.ndim != 1:
      raise ValueError(f"decode expects a [T] or [B, T] array, got shape {arr.shape}")
    vocab = self.vocab
    words = []
    start = self.prefix_len if sentence_only else 0
    for i, t in enumerate(arr.tolist()):
      if i < start:
        continue
      if not 0 <= t < len(vocab):
        words.append(f"<unk:{t}>")
        continue
      w = vocab[t]
      if sentence_only and w == "<eos>":
        break
      if w == "<pad>" and not keep_pad:
        continue
      words.append("\\n" if w == "\n" else w)
    return " ".join(words)

  def __repr__(self) -> str:
    return (f"Grammar({self.name!r}, kind={self.kind!r}, terminals={self.n_terminals}, "
            f"nonterminals={len(self.info.nonterminals)}, V={self.vocab_size})")


# ------------------------------------------------------------------------------------------------
# Construction.


def _sampler_tables(rules, nonterminals, terminals) -> SamplerTables:
  nt_index = {a: i for i, a in enumerate(nonterminals)}
  t_index = {t: i for i, t in enumerate(terminals)}
  n_t = len(terminals)

  def sym(s):
    return t_index[s] if s in t_index else n_t + nt_index[s]

  by_lhs: dict[str, dict[tuple[str, ...], float]] = {a: {} for a in nonterminals}
  for r in rules:
    by_lhs[r.lhs][r.rhs] = by_lhs[r.lhs].get(r.rhs, 0.0) + r.prob
  preterminal = {a: all(len(rhs) == 1 and rhs[0] in t_index for rhs in rs)
                 for a, rs in by_lhs.items()}

  # Fold unary rules A -> B (B a non-preterminal nonterminal) into A: same yield distribution,
  # fewer sampler iterations. Bounded passes guard against unary cycles.
  for _ in range(len(nonterminals)):
    changed = False
    for a in nonterminals:
      new: dict[tuple[str, ...], float] = {}
      for rhs, p in by_lhs[a].items():
        b = rhs[0]
        if len(rhs) == 1 and b in nt_index and not preterminal[b] and b != a:
          changed = True
          for rhs_b, q in by_lhs[b].items():
            new[rhs_b] = new.get(rhs_b, 0.0) + p * q
        else:
          new[rhs] = new.get(rhs, 0.0) + p
      by_lhs[a] = new
    if not changed:
      break

  # Minimum yields (no empty rules, so every symbol yields >= 1 terminal).
  min_yield = {t: 1 for t in terminals}
  for a in nonterminals:
    min_yield[a] = 10**9
  for _ in range(len(nonterminals) + 1):
    for r in rules:
      min_yield[r.lhs] = min(min_yield[r.lhs], sum(min_yield[s] for s in r.rhs))

  n_a = len(nonterminals)
  n_r = max(len(rs) for rs in by_lhs.values())
  n_l = max(len(rhs) for rs in by_lhs.values() for rhs in rs)
  n_w = max(len(rs) for rs in by_lhs.values())
  rule_cum = np.full((n_a, n_r), np.inf, np.float32)
  rule_rhs = np.full((n_a, n_r, n_l), -1, np.int32)
  rule_len = np.zeros((n_a, n_r), np.int32)
  rule_dmin = np.zeros((n_a, n_r), np.int32)
  word_cum = np.full((n_a, n_w), np.inf, np.float32)
  word_id = np.zeros((n_a, n_w), np.int32)
  for a, rs in by_lhs.items():
    i = nt_index[a]
    items = list(rs.items())
    probs = np.array([p for _, p in items], np.float64)
    cum = np.cumsum(probs / probs.sum())
    # Entry r holds P(rule <= r); the last rule's threshold is +inf so rounding never drops it.
    rule_cum[i, : len(items) - 1] = cum[:-1]
    for r, (rhs, _) in enumerate(items):
      rule_rhs[i, r, : len(rhs)] = [sym(s) for s in rhs]
      rule_len[i, r] = len(rhs)
      rule_dmin[i, r] = sum(min_yield[s] for s in rhs) - min_yield[a]
    if preterminal[a]:
      word_cum[i, : len(items) - 1] = cum[:-1]
      word_id[i, : len(items)] = [t_index[rhs[0]] for rhs, _ in items]
  sym_kind = np.array([0] * n_t + [1 if preterminal[a] else 2 for a in nonterminals], np.int32)
  min_yield_s = np.array([1] * n_t + [min_yield[a] for a in nonterminals], np.int32)
  return SamplerTables(rule_cum, rule_rhs, rule_len, rule_dmin, sym_kind, min_yield_s,
                       word_cum, word_id)


def _cnf_tables(rules, nonterminals, terminals) -> tuple[CNFTables, tuple[str, ...]]:
  names = list(nonterminals)
  index = {a: i for i, a in enumerate(names)}
  t_index = {t: i for i, t in enumerate(terminals)}
  artificial = [False] * len(names)

  def new_nt(name):
    index[name] = len(names)
    names.append(name)
    artificial.append(True)
    return index[name]

  lex: list[tuple[int, int, float]] = []
  unary: list[tuple[int, int, float]] = []
  binary: list[tuple[int, int, int, float]] = []
  for k, r in enumerate(rules):
    a = index[r.lhs]
    logp = math.log(r.prob)
    if len(r.rhs) == 1:
      s = r.rhs[0]
      if s in t_index:
        lex.append((a, t_index[s], logp))
      else:
        unary.append((a, index[s], logp))
      continue
    syms = []
    for s in r.rhs:
      if s in t_index:
        pre = f"'{s}'"
        if pre not in index:
          lex.append((new_nt(pre), t_index[s], 0.0))
        syms.append(index[pre])
      else:
        syms.append(index[s])
    parent, lp = a, logp
    for j in range(len(syms) - 2):
      mid = new_nt(f"{r.lhs}#{k}@{j + 1}")
      binary.append((parent, syms[j], mid, lp))
      parent, lp = mid, 0.0
    binary.append((parent, syms[-2], syms[-1], lp))

  n_c, n_v = len(names), len(terminals)
  lex_logp = np.full((n_c, n_v), -np.inf, np.float32)
  for a, v, lp in lex:
    lex_logp[a, v] = lp

  u = np.zeros((n_c, n_c))
  for a, b, lp in unary:
    u[a, b] += math.exp(lp)
  closure = np.linalg.inv(np.eye(n_c) - u)
  with np.errstate(divide="ignore"):
    unary_sum = np.where(closure > 1e-300, np.log(np.maximum(closure, 1e-300)), -np.inf)

  best = np.full((n_c, n_c), -np.inf)
  length = np.zeros((n_c, n_c), np.int64)
  pred = np.full((n_c, n_c), -1, np.int64)
  for a, b, lp in unary:
    if lp > best[a, b]:
      best[a, b], length[a, b], pred[a, b] = lp, 1, a
  np.fill_diagonal(best, 0.0)
  np.fill_diagonal(length, 0)
  np.fill_diagonal(pred, -1)
  for k in range(n_c):  # Floyd–Warshall in the max-plus semiring.
    for i in range(n_c):
      if best[i, k] == -np.inf or i == k:
        continue
      for j in range(n_c):
        if j == k:
          continue
        cand = best[i, k] + best[k, j]
        if cand > best[i, j] + 1e-12:
          best[i, j], length[i, j], pred[i, j] = cand, length[i, k] + length[k, j], pred[k, j]

  # Terminal interchangeability classes: same set of lexical parents.
  keys = [tuple(np.nonzero(np.isfinite(lex_logp[:, v]))[0].tolist()) for v in range(n_v)]
  class_of = {}
  term_class = np.array([class_of.setdefault(key, len(class_of)) for key in keys], np.int32)
  n_k = len(class_of)
  class_terms = np.zeros((n_k, n_v), bool)
  class_terms[term_class, np.arange(n_v)] = True

  first = np.zeros((n_c, n_k), bool)
  for a, v, _ in lex:
    first[a, term_class[v]] = True
  lc = np.eye(n_c, dtype=bool)
  for a, b, _ in unary:
    lc[a, b] = True
  for a, b, _, _ in binary:
    lc[a, b] = True
  for _ in range(n_c):
    lc_next = lc | ((lc.astype(np.int64) @ lc.astype(np.int64)) > 0)
    if (lc_next == lc).all():
      break
    lc = lc_next
  first = (lc.astype(np.int64) @ first.astype(np.int64)) > 0

  b_arr = np.array(binary, dtype=np.float64).reshape(-1, 4)
  tables = CNFTables(
      lex_logp_CV=lex_logp,
      bin_lhs_R=b_arr[:, 0].astype(np.int32),
      bin_left_R=b_arr[:, 1].astype(np.int32),
      bin_right_R=b_arr[:, 2].astype(np.int32),
      bin_logp_R=b_arr[:, 3].astype(np.float32),
      unary_sum_CC=unary_sum.astype(np.float32),
      unary_best_CC=best.astype(np.float32),
      unary_len_CC=length.astype(np.int32),
      unary_pred_CC=pred.astype(np.int32),
      artificial_C=np.array(artificial, bool),
      first_CK=first,
      left_corner_CC=lc,
      term_class_V=term_class,
      class_terms_KV=class_terms,
  )
  return tables, tuple(names)


def from_text(text: str, *, name: str = "custom", kind: str = "pcfg",
              terminals: Sequence[str] | None = None) -> Grammar:
  """Builds a grammar from NLTK-style text (see module docstring).

  Args:
    text: the rules.
    name: a name for reports and checkpoints.
    kind: which exact recogniser applies: 'pcfg' (CKY, any grammar), or 'dyck' /
      'expr_prefix' / 'expr_postfix' for the built-in languages' linear-time recognisers.
    terminals: the vocabulary order of the terminals; default: order of first use.

  Raises:
    rules_lib.GrammarError: malformed text, probabilities not summing to 1, unreachable or
      non-terminating symbols, infinite expected length, or a bad terminal order.
  """
  if kind not in KINDS:
    raise rules_lib.GrammarError(f"kind '{kind}' is unknown; use one of {KINDS}")
  if not isinstance(name, str):
    raise rules_lib.GrammarError(f"name={name!r} must be a str")
  if isinstance(terminals, str):
    raise rules_lib.GrammarError(f"terminals={terminals!r} is a str; pass a sequence of "
                                 "terminal names, e.g. ['a', 'b']")
  rules, quoted = rules_lib.parse_rules(text)
  nonterminals, found_terminals = rules_lib.check_rules(rules, quoted, SPECIALS)
  if terminals is not None:
    terminals = list(terminals)
    missing = [t for t in found_terminals if t not in terminals]
    extra = [t for t in terminals if t not in found_terminals]
    if missing or extra or len(set(terminals)) != len(terminals):
      raise rules_lib.GrammarError(
          f"the terminal order does not match the grammar's terminals "
          f"(missing: {missing}, unused or repeated: {extra or 'duplicates'}); list each "
          "terminal exactly once")
  else:
    terminals = found_terminals
  expected = rules_lib.check_finite_length(rules, nonterminals)
  sampler = _sampler_tables(rules, nonterminals, terminals)
  cnf, cnf_names = _cnf_tables(rules, nonterminals, terminals)
  by_lhs = collections.defaultdict(list)
  for r in rules:
    by_lhs[r.lhs].append(r)
  t_set = set(terminals)
  categories = tuple(a for a in nonterminals if all(len(r.rhs) == 1 and r.rhs[0] in t_set
                                                    for r in by_lhs[a]))
  categories = tuple(sorted(categories, key=lambda a: min(terminals.index(r.rhs[0])
                                                          for r in by_lhs[a])))
  canonical = "\n".join(str(r) for r in rules)
  info = GrammarInfo(name=name, kind=kind, text=canonical, terminals=tuple(terminals),
                     nonterminals=tuple(nonterminals), cnf_names=cnf_names,
                     categories=categories, expected_length=float(expected[0]),
                     min_length=int(sampler.min_yield_S[len(terminals)]))
  return Grammar(info=info, sampler=sampler, cnf=cnf)

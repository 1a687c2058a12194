"""Batched, compiled CKY / inside parsing and prefix viability for any grammar's CNF tables.

`parse` checks full sequences (decorator, sentence, `<eos>`, padding; see `well_formed`) and runs
the inside algorithm (log-space logsumexp) and the Viterbi algorithm over `Grammar.cnf`, then
backtraces the best parse to per-token labels measured in the ORIGINAL grammar: depth,
preterminal, parent and which child of the root's first binary rule holds the token.
`next_terminals` answers prefix viability: after each sentence prefix, which terminals can
follow, and whether the prefix is already a sentence.

Chart layout. CKY is O(N^3 R). Every span table is kept twice so that each span length `l` reads
its children with contiguous `dynamic_slice`s instead of gathers:

* the left layout `x_ILCB[i, l]` holds span (start i, length l): the left children of every span
  starting at i are the run `x_ILCB[i, 1:l]`;
* the right layout `x_JKCB[j, N - l]` holds span (end j, length l): the right children of span
  (i, i + l) are `x_JKCB[i + l, N - l + m]` for splits m, again one contiguous run.

The batch is the minor axis (C nonterminals and R rules are too few to vectorise over; this
layout measured 2-3x faster than `vmap` over sentences). Length 0, and lengths that run past
the chart, stay -inf (False), so split points m >= l and spans past the chart end need no
masks; tokens that are not terminals (`<eos>`, `<pad>`) have no lexical rule, so spans past a
sentence's end are impossible by themselves and one chart size serves every shorter sentence.
The loop over l (`lax.fori_loop`) is cut into up to four phases with static slice widths: short
spans only look at short splits and long spans only at early starts, which does about a third
of the work of a full N x N window. The unary closure only touches the pairs that unary chains
join (read from the rule text, so it is static even when the tables are traced).

Compilation. The compiled cores see only the CNF arrays and static vocabulary ids, unary
pattern and chart size, so grammars that agree on those (e.g. the two Dyck grammars) share a
compilation. When given concrete arrays, `parse` and `next_terminals` group the rows by
sentence length into chart sizes 8, 16, 32, 64 and the maximum, run each group in chunks whose
row count is a power of two (each shape compiled once, then reused), and scatter the results
back in order; under `jax.jit` (traced tokens) they run one chart of the maximum size. Both give
the same results.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grammars import pcfg
from jaxsae.grammars import token_check

_BUCKETS = (8, 16, 32, 64)
# Chart elements (rows * N^2 * C) per compiled call on the host-bucketed path: bounds memory
# (~11 such float tables per sentence) while keeping batches large enough to vectorise well.
_CHUNK_ELEMENTS = 1 << 20
_MAX_CHUNK_ROWS = 1024
_MIN_CHUNK_ROWS = 8


@flax.struct.dataclass
class ParseResult:
  """Per-sequence verdicts and per-token labels of the best parse (see `parse`).

  Attributes:
    grammatical: bool [B]: the sequence is well formed and its sentence is in the language.
    logprob: f32 [B]: log P(sentence), summed over all parses; -inf if not grammatical.
    viterbi_logprob: f32 [B]: log-probability of the best parse; -inf if not grammatical.
    length: i32 [B]: sentence length n (first `<eos>` position - 7; T - 7 without `<eos>`).
    depth: i32 [B, T]: number of original nonterminals above each sentence token in the best
      parse (the root counts 1); -1 elsewhere and for ungrammatical rows.
    preterminal: i32 [B, T]: original nonterminal directly above the token; -1 if the token
      sits inside a longer rule (its CNF parent is an artificial preterminal), or elsewhere.
    parent: i32 [B, T]: nearest original nonterminal above the token's preterminal (above the
      token itself when it has no original preterminal; for English conjunctions NP or VP, the
      coordination scope); -1 when there is none (a one-token sentence) and elsewhere.
    root_child: i32 [B, T]: 0 if the token lies in the left child span of the root's first
      binary rule (for English S -> NP VP: the subject), 1 if in the right one; 0 for one-token
      sentences; -1 elsewhere.
  """

  grammatical: jax.Array
  logprob: jax.Array
  viterbi_logprob: jax.Array
  length: jax.Array
  depth: jax.Array
  preterminal: jax.Array
  parent: jax.Array
  root_child: jax.Array


class _Static(NamedTuple):
  """What the compiled cores need at trace time (hashable): vocabulary ids, unary pattern."""

  n_terminals: int
  eos_id: int
  pad_id: int
  decorator_ids: tuple[int, ...]
  unary_targets: tuple[int, ...]  # nonterminals A with A =>+ B for some B != A
  unary_sources: tuple[tuple[int, ...], ...]  # those B, per target, padded with -1


@functools.lru_cache(maxsize=None)
def _unary_pattern(info: pcfg.GrammarInfo):
  """Pairs A =>+ B of unary chains, from the rule text (static even when the tables are traced).

  Unary rules only join original nonterminals, whose CNF ids are their `info.nonterminals` ids.
  """
  rules, _ = pcfg.parse_rules(info.text)
  index = {a: i for i, a in enumerate(info.nonterminals)}
  reach = {i: set() for i in index.values()}
  for r in rules:
    if len(r.rhs) == 1 and r.rhs[0] in index:
      reach[index[r.lhs]].add(index[r.rhs[0]])
  changed = True
  while changed:
    changed = False
    for a in reach:
      more = set().union(*(reach[b] for b in reach[a])) - reach[a]
      if more:
        reach[a] |= more
        changed = True
  targets = tuple(a for a in sorted(reach) if reach[a] - {a})
  width = max([len(reach[a] - {a}) for a in targets], default=0)
  sources = tuple(tuple(sorted(reach[a] - {a})) for a in targets)
  sources = tuple(src + (-1,) * (width - len(src)) for src in sources)
  return targets, sources


def _static(grammar: pcfg.Grammar) -> _Static:
  targets, sources = _unary_pattern(grammar.info)
  return _Static(grammar.n_terminals, grammar.eos_id, grammar.pad_id, grammar.decorator_ids,
                 targets, sources)


def _unary_close(static: _Static, weight_CC, pre_ICB, times, reduce, zero):
  """Applies the unary closure: post[A] = sum_B weight[A, B] * pre[B] in a semiring.

  Only the pairs joined by unary chains are touched (the diagonal always is): a dense C x C
  product would cost more than the binary rules on short charts.
  """
  diag_C = jnp.diagonal(weight_CC)
  post_ICB = times(diag_C[None, :, None], pre_ICB)
  if not static.unary_targets:
    return post_ICB
  targets_T = np.asarray(static.unary_targets)
  sources_TS = np.asarray(static.unary_sources)
  valid_TS = sources_TS >= 0
  sources_TS = np.maximum(sources_TS, 0)
  chain_ITSB = times(weight_CC[targets_T[:, None], sources_TS][None, :, :, None],
                     pre_ICB[:, sources_TS])
  chain_ITSB = jnp.where(valid_TS[None, :, :, None], chain_ITSB, zero)
  both_ITSB = jnp.concatenate([post_ICB[:, targets_T][:, :, None], chain_ITSB], axis=2)
  return post_ICB.at[:, targets_T].set(reduce(both_ITSB, axis=2))


# ------------------------------------------------------------------------------------------------
# Sequence format.


def _format_check(static: _Static, tokens_BT):
  """Returns (decorator ok [B], well formed [B], sentence length [B]); numpy or jax in, same out."""
  xp = jnp if isinstance(tokens_BT, jax.Array) else np
  n_dec = len(static.decorator_ids)
  t = tokens_BT.shape[1]
  decorator_ok_B = xp.all(tokens_BT[:, :n_dec] == xp.asarray(static.decorator_ids)[None, :], axis=1)
  is_eos_BT = tokens_BT == static.eos_id
  pos_T = xp.arange(t)
  # First <eos> at or after the sentence start; T when there is none.
  eos_at_BT = is_eos_BT & (pos_T >= n_dec)[None, :]
  first_eos_B = xp.min(xp.where(eos_at_BT, pos_T[None, :], t), axis=1)
  length_B = first_eos_B - n_dec
  in_sentence_BT = (pos_T[None, :] >= n_dec) & (pos_T[None, :] < first_eos_B[:, None])
  after_BT = pos_T[None, :] > first_eos_B[:, None]
  is_terminal_BT = (tokens_BT >= 0) & (tokens_BT < static.n_terminals)
  well_formed_B = (decorator_ok_B & (first_eos_B < t) & (length_B >= 1)
                   & xp.all(is_terminal_BT | ~in_sentence_BT, axis=1)
                   & xp.all((tokens_BT == static.pad_id) | ~after_BT, axis=1))
  return decorator_ok_B, well_formed_B, length_B.astype(xp.int32)


def well_formed(grammar: pcfg.Grammar, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Checks the sequence format, not the grammar: exact decorator, sentence, `<eos>`, padding.

  Args:
    grammar: supplies the vocabulary ids.
    tokens_BT: int [B, T] full sequences.

  Returns:
    `(ok_B, length_B)`: whether the decorator is exact, an `<eos>` follows a non-empty run of
    terminals and only `<pad>` follows the first `<eos>`; and the sentence length (first
    `<eos>` position - 7, or T - 7 when there is none).
  """
  tokens_BT = token_check.check(grammar, tokens_BT, where="well_formed",
                                min_len=grammar.prefix_len + 1)
  _, ok_B, length_B = _format_check(_static(grammar), jnp.asarray(tokens_BT))
  return ok_B, length_B


def _sentence_tokens(static: _Static, tokens_BT, n_chart: int):
  """Tokens at sentence positions 7..7+N, as lexical-table columns: non-terminals -> V."""
  n_dec = len(static.decorator_ids)
  sent = tokens_BT[:, n_dec:n_dec + n_chart]
  short = n_chart - sent.shape[1]
  if short > 0:
    sent = jnp.pad(sent, ((0, 0), (0, short)), constant_values=-1)
  is_terminal = (sent >= 0) & (sent < static.n_terminals)
  return jnp.where(is_terminal, sent, static.n_terminals).astype(jnp.int32)


def _to_positions(x_BN, t: int, n_dec: int, fill):
  """Places per-sentence-position values [B, N] at sequence positions 7.. of a [B, T] array."""
  width = min(x_BN.shape[1], t - n_dec)
  out = jnp.full((x_BN.shape[0], t) + x_BN.shape[2:], fill, x_BN.dtype)
  return out.at[:, n_dec:n_dec + width].set(x_BN[:, :width])


# ------------------------------------------------------------------------------------------------
# Chart machinery shared by the inside/Viterbi and prefix charts.


def _phases(n_chart: int) -> list[tuple[int, int]]:
  """Splits span lengths 2..N into up to 4 contiguous ranges (lo, hi) with static widths."""
  n_phases = 1 if n_chart <= 8 else 2 if n_chart <= 16 else 4
  bounds = sorted({2} | {max(2, round(n_chart * k / n_phases)) + 1 for k in range(1, n_phases)}
                  | {n_chart + 1})
  return [(lo, hi - 1) for lo, hi in zip(bounds[:-1], bounds[1:]) if lo <= hi - 1]


def _split_views(left_ILX, right_JKX, l, lo: int, hi: int, n_chart: int):
  """Children of every span of length l (in phase lo..hi): [I, M, ...] left and right tables.

  Row i, column m holds span (i, m) on the left and span (i + m, l - m) on the right; entries
  with m = 0 or m >= l read a length <= 0 and are -inf / False.
  """
  width_i, width_m = n_chart - lo + 1, hi
  left = left_ILX[:width_i, :width_m]
  start = (l, n_chart - l) + (0,) * (right_JKX.ndim - 2)
  right = jax.lax.dynamic_slice(right_JKX, start, (width_i, width_m) + right_JKX.shape[2:])
  return left, right


def _write(left_ILX, right_JKX, new_IX, l, n_chart: int):
  """Stores the new spans of length l (rows i < width) in both layouts."""
  zeros = (0,) * (new_IX.ndim - 1)
  left_ILX = jax.lax.dynamic_update_slice(left_ILX, new_IX[:, None], (0, l) + zeros)
  right_JKX = jax.lax.dynamic_update_slice(right_JKX, new_IX[:, None], (l, n_chart - l) + zeros)
  return left_ILX, right_JKX


def _lse(x, axis: int):
  """logsumexp that returns -inf (not nan) when every entry is -inf."""
  mx = jnp.max(x, axis=axis, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  return jnp.log(jnp.sum(jnp.exp(x - mx), axis=axis)) + jnp.squeeze(mx, axis)


def _binary_rules(cnf: pcfg.CNFTables):
  """(lhs_R, left_R, right_R, logp_R, lhs_RC) of the binary rules; lhs_RC[r, c] = lhs is c.

  A grammar without binary rules (only one-token sentences) gets one impossible rule (log-prob
  -inf, no left-hand side) so that every reduction over rules has something to reduce.
  """
  lhs_R, left_R, right_R = (jnp.asarray(x, jnp.int32)
                            for x in (cnf.bin_lhs_R, cnf.bin_left_R, cnf.bin_right_R))
  logp_R = jnp.asarray(cnf.bin_logp_R, jnp.float32)
  n_c = cnf.lex_logp_CV.shape[0]
  lhs_RC = lhs_R[:, None] == jnp.arange(n_c)[None, :]
  if lhs_R.shape[0] == 0:
    lhs_R, left_R, right_R = (jnp.zeros((1,), jnp.int32) for _ in range(3))
    logp_R = jnp.full((1,), -jnp.inf, jnp.float32)
    lhs_RC = jnp.zeros((1, n_c), bool)
  return lhs_R, left_R, right_R, logp_R, lhs_RC


def _by_lhs(x_IRB, lhs_RC, reduce, fill):
  """Reduces rule scores [I, R, B] over rules with the same left-hand side: [I, C, B]."""
  return reduce(jnp.where(lhs_RC[None, :, :, None], x_IRB[:, :, None, :], fill), axis=1)


# ------------------------------------------------------------------------------------------------
# Inside and Viterbi charts, backtrace.


class _Charts(NamedTuple):
  """Charts of a batch; the batch is the minor axis so every vector op runs along it."""

  inside_ILCB: jax.Array  # log inside probability after unary closure
  inside_JKCB: jax.Array
  best_ILCB: jax.Array  # Viterbi score after unary closure
  best_JKCB: jax.Array
  best_pre_ILCB: jax.Array  # Viterbi score before unary closure (binary or lexical top)


def _charts(cnf: pcfg.CNFTables, static: _Static, sent_BN: jax.Array) -> _Charts:
  """Inside and Viterbi charts (`sent_BN` holds columns of `lex_logp_CV`, V = no terminal)."""
  b, n_chart = sent_BN.shape
  n_c = cnf.lex_logp_CV.shape[0]
  neg = -jnp.inf
  lex_CV = jnp.concatenate([cnf.lex_logp_CV, jnp.full((n_c, 1), neg, jnp.float32)], axis=1)
  lex_NCB = jnp.transpose(lex_CV[:, sent_BN], (2, 0, 1))
  unary_sum_CC = jnp.asarray(cnf.unary_sum_CC)
  unary_best_CC = jnp.asarray(cnf.unary_best_CC)
  _, left_R, right_R, logp_R, lhs_RC = _binary_rules(cnf)

  def close_inside(pre_ICB):
    return _unary_close(static, unary_sum_CC, pre_ICB, jnp.add, _lse, neg)

  def close_best(pre_ICB):
    return _unary_close(static, unary_best_CC, pre_ICB, jnp.add, jnp.max, neg)

  def rule_scores(left_IMCB, right_IMCB):
    return left_IMCB[:, :, left_R] + right_IMCB[:, :, right_R] + logp_R[None, None, :, None]

  left_shape = (n_chart, n_chart + 1, n_c, b)
  right_shape = (2 * n_chart, 2 * n_chart, n_c, b)
  charts = _Charts(*(jnp.full(s, neg, jnp.float32)
                     for s in (left_shape, right_shape, left_shape, right_shape, left_shape)))
  inside_ILCB, inside_JKCB = _write(charts.inside_ILCB, charts.inside_JKCB,
                                    close_inside(lex_NCB), 1, n_chart)
  best_ILCB, best_JKCB = _write(charts.best_ILCB, charts.best_JKCB, close_best(lex_NCB), 1,
                                n_chart)
  best_pre_ILCB = charts.best_pre_ILCB.at[:, 1].set(lex_NCB)
  charts = _Charts(inside_ILCB, inside_JKCB, best_ILCB, best_JKCB, best_pre_ILCB)

  def phase_step(lo, hi):
    def step(l, c: _Charts) -> _Charts:
      score_IMRB = rule_scores(*_split_views(c.inside_ILCB, c.inside_JKCB, l, lo, hi, n_chart))
      inside_ICB = close_inside(_by_lhs(_lse(score_IMRB, axis=1), lhs_RC, _lse, neg))
      score_IMRB = rule_scores(*_split_views(c.best_ILCB, c.best_JKCB, l, lo, hi, n_chart))
      pre_ICB = _by_lhs(jnp.max(score_IMRB, axis=1), lhs_RC, jnp.max, neg)
      inside_ILCB, inside_JKCB = _write(c.inside_ILCB, c.inside_JKCB, inside_ICB, l, n_chart)
      best_ILCB, best_JKCB = _write(c.best_ILCB, c.best_JKCB, close_best(pre_ICB), l, n_chart)
      best_pre_ILCB = jax.lax.dynamic_update_slice(c.best_pre_ILCB, pre_ICB[:, None],
                                                   (0, l, 0, 0))
      return _Charts(inside_ILCB, inside_JKCB, best_ILCB, best_JKCB, best_pre_ILCB)
    return step

  for lo, hi in _phases(n_chart):
    charts = jax.lax.fori_loop(lo, hi + 1, phase_step(lo, hi), charts)
  return charts


class _Labels(NamedTuple):
  """Per-token labels of one sentence's best parse (-1 where unset)."""

  depth_N: jax.Array
  preterminal_N: jax.Array
  parent_N: jax.Array
  root_child_N: jax.Array


def _backtrace(cnf: pcfg.CNFTables, best_ILC, best_JKC, best_pre_ILC, length, run) -> _Labels:
  """Walks the best parse of one sentence top-down with an explicit stack.

  A stack entry is a span (i, j), its top nonterminal A, the depth of A counted in original
  nonterminals (an artificial node has its parent's depth, so it never adds depth), the nearest
  original ancestor strictly above A, and the root child (-1 until the root's first binary rule).
  """
  n_chart, _, n_c = best_ILC.shape
  unary_best_CC = jnp.asarray(cnf.unary_best_CC)
  unary_len_CC = jnp.asarray(cnf.unary_len_CC)
  unary_pred_CC = jnp.asarray(cnf.unary_pred_CC)
  artificial_C = jnp.asarray(cnf.artificial_C)
  lhs_R, left_R, right_R, logp_R, _ = _binary_rules(cnf)
  n_r = left_R.shape[0]
  # A binary tree over n leaves has at most n - 1 pending right siblings; +2 for the push.
  size = n_chart + 2
  minus = jnp.full((n_chart,), -1, jnp.int32)
  stack_init = jnp.zeros((6, size), jnp.int32).at[:, 0].set(
      jnp.stack([0, length, 0, 1, -1, -1]).astype(jnp.int32))
  init = (stack_init, jnp.where(run, 1, 0), _Labels(minus, minus, minus, minus))

  def body(state):
    stack, sp, labels = state
    sp = sp - 1
    i, j, top, depth, ancestor, root_child = stack[:, sp]
    span = j - i
    # Bottom of the best unary chain top =>* bottom over this span.
    pre_C = best_pre_ILC[i, span]
    bottom = jnp.argmax(unary_best_CC[top] + pre_C).astype(jnp.int32)
    chain = unary_len_CC[top, bottom]
    bottom_depth = depth + chain
    bottom_ancestor = jnp.where(chain >= 1, unary_pred_CC[top, bottom], ancestor)
    bottom_artificial = artificial_C[bottom]
    # A leaf: record the token's labels.
    leaf = span == 1
    pos = jnp.where(leaf, i, n_chart)  # out of range: dropped
    labels = _Labels(
        labels.depth_N.at[pos].set(bottom_depth, mode="drop"),
        labels.preterminal_N.at[pos].set(jnp.where(bottom_artificial, -1, bottom), mode="drop"),
        labels.parent_N.at[pos].set(bottom_ancestor, mode="drop"),
        labels.root_child_N.at[pos].set(jnp.maximum(root_child, 0), mode="drop"))
    # An inner node: best split m and binary rule r with left-hand side `bottom`.
    left_MC = best_ILC[i, :n_chart]
    right_MC = jax.lax.dynamic_slice(best_JKC, (j, n_chart - span, 0), (1, n_chart, n_c))[0]
    score_MR = (left_MC[:, left_R] + right_MC[:, right_R] + logp_R[None, :]
                + jnp.where(lhs_R == bottom, 0.0, -jnp.inf)[None, :])
    best = jnp.argmax(score_MR.reshape(-1)).astype(jnp.int32)
    m, r = best // n_r, best % n_r
    child_l, child_r = left_R[r], right_R[r]
    child_ancestor = jnp.where(bottom_artificial, bottom_ancestor, bottom)
    depth_l = bottom_depth + jnp.where(artificial_C[child_l], 0, 1)
    depth_r = bottom_depth + jnp.where(artificial_C[child_r], 0, 1)
    rc_l = jnp.where(root_child < 0, 0, root_child)
    rc_r = jnp.where(root_child < 0, 1, root_child)
    # Push the right child, then the left one (popped first); leaves push nothing.
    entry_r = jnp.stack([i + m, j, child_r, depth_r, child_ancestor, rc_r])
    entry_l = jnp.stack([i, i + m, child_l, depth_l, child_ancestor, rc_l])
    stack = jax.lax.dynamic_update_slice(stack, jnp.stack([entry_r, entry_l], axis=1), (0, sp))
    sp = jnp.where(leaf, sp, sp + 2)
    return stack, sp, labels

  _, _, labels = jax.lax.while_loop(lambda s: s[1] > 0, body, init)
  return labels


def _chunk_rows(n_chart: int, n_c: int) -> int:
  """Rows per chart batch: a power of two with about `_CHUNK_ELEMENTS` chart cells."""
  rows = _CHUNK_ELEMENTS // (n_chart * n_chart * n_c)
  rows = 1 << max(0, rows.bit_length() - 1)
  return int(np.clip(rows, _MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS))


def _in_chunks(rows_fn, cnf: pcfg.CNFTables, tokens_BT: jax.Array, n_chart: int):
  """Applies `rows_fn` to chunks of rows in sequence (`lax.map`).

  Memory then stays bounded however large the batch, and each chunk's charts stay cache-sized.
  """
  b, t = tokens_BT.shape
  rows = _chunk_rows(n_chart, cnf.lex_logp_CV.shape[0])
  if b <= rows:
    return rows_fn(tokens_BT)
  n = -(-b // rows)
  padded = jnp.pad(tokens_BT, ((0, n * rows - b), (0, 0)), constant_values=-1)
  out = jax.lax.map(rows_fn, padded.reshape(n, rows, t))
  return jax.tree.map(lambda x: x.reshape((n * rows,) + x.shape[2:])[:b], out)


@functools.partial(jax.jit, static_argnames=("static", "n_chart"))
def _parse_core(cnf: pcfg.CNFTables, tokens_BT: jax.Array, *, static: _Static,
                n_chart: int) -> ParseResult:
  """`parse` on one chart size N (traced path; also each bucket of the host path)."""
  return _in_chunks(lambda x: _parse_rows(cnf, x, static, n_chart), cnf, tokens_BT, n_chart)


def _parse_rows(cnf: pcfg.CNFTables, tokens_BT: jax.Array, static: _Static,
                n_chart: int) -> ParseResult:
  b, t = tokens_BT.shape
  n_dec = len(static.decorator_ids)
  _, ok_B, length_B = _format_check(static, tokens_BT)
  sent_BN = _sentence_tokens(static, tokens_BT, n_chart)
  charts = _charts(cnf, static, sent_BN)
  length_idx_B = jnp.clip(length_B, 0, n_chart)
  rows_B = jnp.arange(b)
  logprob_B = charts.inside_ILCB[0, length_idx_B, 0, rows_B]
  best_B = charts.best_ILCB[0, length_idx_B, 0, rows_B]
  grammatical_B = ok_B & (length_B <= n_chart) & (best_B > -jnp.inf)
  # The backtrace reads one sentence at a time: batch-major copies (cheap next to the O(N^3)
  # charts) keep its reads contiguous.
  batch_major = [jnp.moveaxis(x, -1, 0)
                 for x in (charts.best_ILCB, charts.best_JKCB, charts.best_pre_ILCB)]
  labels = jax.vmap(_backtrace, in_axes=(None, 0, 0, 0, 0, 0))(cnf, *batch_major, length_idx_B,
                                                               grammatical_B)
  neg = jnp.float32(-jnp.inf)
  return ParseResult(
      grammatical=grammatical_B,
      logprob=jnp.where(grammatical_B, logprob_B, neg),
      viterbi_logprob=jnp.where(grammatical_B, best_B, neg),
      length=length_B,
      depth=_to_positions(labels.depth_N, t, n_dec, -1),
      preterminal=_to_positions(labels.preterminal_N, t, n_dec, -1),
      parent=_to_positions(labels.parent_N, t, n_dec, -1),
      root_child=_to_positions(labels.root_child_N, t, n_dec, -1),
  )


# ------------------------------------------------------------------------------------------------
# Prefix viability.


class _PrefixCharts(NamedTuple):
  """Boolean prefix charts of a batch (batch minor, as `_Charts`)."""

  ok_ILCB: jax.Array  # the span derives exactly from C
  ok_JKCB: jax.Array
  follow_JKCKB: jax.Array  # F: C derives the span followed by a terminal of class K
  start_follow_LKB: jax.Array  # F[l, 0, S]: what may follow the sentence prefix of length l
  start_ok_LB: jax.Array  # ok[l, 0, S]: the prefix of length l is a sentence


def _prefix_charts(cnf: pcfg.CNFTables, static: _Static,
                   sent_BN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For prefixes of length l = 0..N: classes that can follow (F[l, 0, S]) and completeness."""
  b, n_chart = sent_BN.shape
  n_c = cnf.lex_logp_CV.shape[0]
  first_CK = jnp.asarray(cnf.first_CK)
  n_k = first_CK.shape[1]
  lex_CV = jnp.concatenate([jnp.isfinite(cnf.lex_logp_CV), jnp.zeros((n_c, 1), bool)], axis=1)
  reach_CC = jnp.isfinite(cnf.unary_sum_CC)
  corner_CC = jnp.asarray(cnf.left_corner_CC)
  _, left_R, right_R, _, lhs_RC = _binary_rules(cnf)
  first_RK = first_CK[right_R]

  def close(pre_ICB):
    return _unary_close(static, reach_CC, pre_ICB, jnp.logical_and, jnp.any, False)

  ok_ILCB = jnp.zeros((n_chart, n_chart + 1, n_c, b), bool)
  ok_JKCB = jnp.zeros((2 * n_chart, 2 * n_chart, n_c, b), bool)
  lex_NCB = jnp.transpose(lex_CV[:, sent_BN], (2, 0, 1))
  ok_ILCB, ok_JKCB = _write(ok_ILCB, ok_JKCB, close(lex_NCB), 1, n_chart)
  charts = _PrefixCharts(
      ok_ILCB, ok_JKCB, jnp.zeros((2 * n_chart, 2 * n_chart, n_c, n_k, b), bool),
      jnp.zeros((n_chart + 1, n_k, b), bool).at[0].set(
          jnp.broadcast_to(first_CK[0][:, None], (n_k, b))),
      jnp.zeros((n_chart + 1, b), bool))

  def phase_step(lo, hi):
    def step(l, c: _PrefixCharts) -> _PrefixCharts:
      # Exact spans of length l (length 1 is the lexical base, already written).
      left, right = _split_views(c.ok_ILCB, c.ok_JKCB, l, lo, hi, n_chart)
      rule_IRB = jnp.any(left[:, :, left_R] & right[:, :, right_R], axis=1)
      ok_ICB = c.ok_ILCB[:left.shape[0], l] | close(_by_lhs(rule_IRB, lhs_RC, jnp.any, False))
      ok_ILCB, ok_JKCB = _write(c.ok_ILCB, c.ok_JKCB, ok_ICB, l, n_chart)
      # B -> X Y straddles the prefix end: X covers the whole span and Y starts with K, or
      # X covers its first m tokens and Y covers the rest followed by K.
      _, follow = _split_views(c.follow_JKCKB, c.follow_JKCKB, l, lo, hi, n_chart)
      straddle_IRKB = (ok_ICB[:, left_R, None, :] & first_RK[None, :, :, None]) | jnp.any(
          left[:, :, left_R, None, :] & follow[:, :, right_R], axis=1)
      g_ICKB = jnp.any(lhs_RC[None, :, :, None, None] & straddle_IRKB[:, :, None], axis=1)
      # Climb left corners: A derives B ... with B the lowest node straddling the prefix end.
      follow_ICKB = jnp.any(corner_CC[None, :, :, None, None] & g_ICKB[:, None], axis=2)
      follow_JKCKB = jax.lax.dynamic_update_slice(
          c.follow_JKCKB, follow_ICKB[:, None], (l, n_chart - l, 0, 0, 0))
      start_follow_LKB = jax.lax.dynamic_update_slice(
          c.start_follow_LKB, follow_ICKB[:1, 0], (l, 0, 0))
      start_ok_LB = jax.lax.dynamic_update_slice(c.start_ok_LB, ok_ICB[:1, 0], (l, 0))
      return _PrefixCharts(ok_ILCB, ok_JKCB, follow_JKCKB, start_follow_LKB, start_ok_LB)
    return step

  # Length 1 runs the same step (it has no splits) to get its follow sets.
  for lo, hi in [(1, 1)] + _phases(n_chart):
    charts = jax.lax.fori_loop(lo, hi + 1, phase_step(lo, hi), charts)
  return charts.start_follow_LKB, charts.start_ok_LB


@functools.partial(jax.jit, static_argnames=("static", "n_chart"))
def _next_core(cnf: pcfg.CNFTables, tokens_BT: jax.Array, *, static: _Static, n_chart: int):
  """`next_terminals` on one chart size N (traced path; also each bucket of the host path)."""
  return _in_chunks(lambda x: _next_rows(cnf, x, static, n_chart), cnf, tokens_BT, n_chart)


def _next_rows(cnf: pcfg.CNFTables, tokens_BT: jax.Array, static: _Static, n_chart: int):
  t = tokens_BT.shape[1]
  n_dec = len(static.decorator_ids)
  decorator_ok_B, _, _ = _format_check(static, tokens_BT)
  sent_BN = _sentence_tokens(static, tokens_BT, n_chart)
  follow_LKB, complete_LB = _prefix_charts(cnf, static, sent_BN)
  follow_BLK, complete_BL = jnp.transpose(follow_LKB, (2, 0, 1)), complete_LB.T
  class_terms_KV = jnp.asarray(cnf.class_terms_KV)
  next_BLV = jnp.any(follow_BLK[:, :, :, None] & class_terms_KV[None, None], axis=2)
  viable_BL = jnp.any(follow_BLK, axis=2) | complete_BL
  # Prefix length l ends at position 6 + l: row l = 0 is the empty prefix at `Out:`.
  viable_BT = _to_positions(viable_BL, t, n_dec - 1, False) & decorator_ok_B[:, None]
  next_BTV = _to_positions(next_BLV, t, n_dec - 1, False) & decorator_ok_B[:, None, None]
  complete_BT = _to_positions(complete_BL, t, n_dec - 1, False) & decorator_ok_B[:, None]
  return viable_BT, next_BTV, complete_BT


# ------------------------------------------------------------------------------------------------
# Public entry points and host-side bucketing.


def _is_traced(*trees) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _bucketed(core, grammar: pcfg.Grammar, tokens_BT: np.ndarray, rows_B: np.ndarray,
              need_B: np.ndarray, n_max: int, empty_outputs):
  """Runs `core` on rows grouped by the chart size they need; scatters results back in order.

  Args:
    core: a compiled core `(cnf, tokens, static=, n_chart=) -> pytree of [b, ...] arrays`.
    rows_B: bool, rows worth parsing (the others keep `empty_outputs`).
    need_B: chart size each row needs (<= n_max).
    empty_outputs: pytree of numpy [B, ...] arrays holding the answers for skipped rows.
  """
  static = _static(grammar)
  n_c = grammar.cnf.lex_logp_CV.shape[0]
  sizes = [s for s in _BUCKETS if s < n_max] + [n_max]
  filler = np.full((1, tokens_BT.shape[1]), static.pad_id, tokens_BT.dtype)
  pending = []
  lower = 0
  for size in sizes:
    idx = np.nonzero(rows_B & (need_B > lower) & (need_B <= size))[0]
    lower = size
    chunk = _chunk_rows(size, n_c)
    for start in range(0, len(idx), chunk):
      part = idx[start:start + chunk]
      # Row counts are powers of two from chunk / 8 up: at most four shapes per bucket.
      padded = min(chunk, max(_MIN_CHUNK_ROWS, chunk // 8, 1 << (len(part) - 1).bit_length()))
      block = np.concatenate([tokens_BT[part], np.repeat(filler, padded - len(part), 0)], 0)
      pending.append((part, core(grammar.cnf, block, static=static, n_chart=size)))
  outputs = jax.tree.map(np.array, empty_outputs)
  for part, result in pending:
    def put(out, res, part=part):
      out[part] = np.asarray(res)[:len(part)]
    jax.tree.map(put, outputs, result)
  return jax.tree.map(jnp.asarray, outputs)


def _default_len(max_sentence_len: int | None, default: int) -> int:
  n = default if max_sentence_len is None else int(max_sentence_len)
  if n < 1:
    raise ValueError(f"max_sentence_len must be >= 1, got {n}: pass a positive chart size, or "
                     "sequences long enough to hold the 7-token decorator and a sentence")
  return n


def parse(grammar: pcfg.Grammar, tokens_BT: jax.Array, *,
          max_sentence_len: int | None = None) -> ParseResult:
  """Parses full sequences with the inside and Viterbi algorithms (works inside `jax.jit`).

  A row is grammatical iff the decorator is exact, an `<eos>` follows a non-empty sentence of
  terminals, only `<pad>` follows the first `<eos>`, and the start symbol derives the sentence.
  Labels come from the best (Viterbi) parse, measured in the original grammar (artificial CNF
  nonterminals are not tree nodes); see `ParseResult`. Ties between equally good parses are
  broken by the lowest split point and rule index.

  With concrete `tokens_BT` the rows are grouped by sentence length into chart sizes 8, 16, 32,
  64 and `max_sentence_len` (a handful of compilations, each reused on later calls) and the
  results are scattered back in order; with traced tokens (under `jax.jit`) one chart of size
  `max_sentence_len` serves the whole batch. Both give the same answers.

  Args:
    grammar: any grammar (its `cnf` tables are used).
    tokens_BT: int [B, T] full sequences (decorator, sentence, `<eos>`, `<pad>`...).
    max_sentence_len: chart size N (static): longest sentence parsed; longer ones are reported
      ungrammatical. Default T - 8, the longest that fits with its `<eos>`.

  Returns:
    A `ParseResult`.

  Raises:
    TypeError / ValueError: `tokens_BT` is not an integer [B, T] array of ids in
      [0, vocab_size) with T >= 9 (`token_check.check`; under jit only dtype and shape).
  """
  tokens_BT = token_check.check(grammar, tokens_BT, where="parse")
  t = tokens_BT.shape[1]
  n_max = _default_len(max_sentence_len, t - len(pcfg.DECORATOR) - 1)
  static = _static(grammar)
  if _is_traced(tokens_BT, grammar.cnf):
    return _parse_core(grammar.cnf, jnp.asarray(tokens_BT, jnp.int32), static=static,
                       n_chart=n_max)
  tokens_BT = np.asarray(tokens_BT).astype(np.int32)
  b = tokens_BT.shape[0]
  _, ok_B, length_B = _format_check(static, tokens_BT)
  minus_BT = np.full((b, t), -1, np.int32)
  neg_B = np.full((b,), -np.inf, np.float32)
  empty = ParseResult(grammatical=np.zeros((b,), bool), logprob=neg_B, viterbi_logprob=neg_B,
                      length=length_B, depth=minus_BT, preterminal=minus_BT, parent=minus_BT,
                      root_child=minus_BT)
  rows_B = ok_B & (length_B <= n_max)
  return _bucketed(_parse_core, grammar, tokens_BT, rows_B, length_B, n_max, empty)


def next_terminals(grammar: pcfg.Grammar, tokens_BT: jax.Array, *,
                   max_sentence_len: int | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Prefix viability: which terminals may follow each sentence prefix (works inside jit).

  Position t holds the prefix made of the sentence tokens at positions 7..t (the empty prefix
  at position 6, `Out:`, whose next set is FIRST(S)). Tokens that are not terminals (`<eos>`,
  specials) are never part of a viable prefix, so every position from the first such token on
  is False. The legal next tokens of a sequence after position t are `next[t]`, plus `<eos>`
  where `complete[t]`.

  Args:
    grammar: any grammar.
    tokens_BT: int [B, T] sequences; rows with a wrong decorator are False everywhere.
    max_sentence_len: chart size N (static): prefixes of up to N tokens are answered, later
      positions are False. Default T - 7 (every position). Concrete inputs are bucketed by the
      length of their leading run of terminals, as in `parse`.

  Returns:
    `(viable_BT, next_BTV, complete_BT)`: the prefix ending at t is a prefix of some sentence;
    terminal v can follow it (V = `grammar.n_terminals`); it is itself a sentence.

  Raises:
    TypeError / ValueError: `tokens_BT` is not an integer [B, T] array of ids in
      [0, vocab_size) with T >= 8 (`token_check.check`; under jit only dtype and shape).
  """
  tokens_BT = token_check.check(grammar, tokens_BT, where="next_terminals",
                                min_len=grammar.prefix_len + 1)
  b, t = tokens_BT.shape
  n_dec = len(pcfg.DECORATOR)
  n_max = _default_len(max_sentence_len, t - n_dec)
  static = _static(grammar)
  if _is_traced(tokens_BT, grammar.cnf):
    return _next_core(grammar.cnf, jnp.asarray(tokens_BT, jnp.int32), static=static,
                      n_chart=n_max)
  tokens_BT = np.asarray(tokens_BT).astype(np.int32)
  decorator_ok_B, _, _ = _format_check(static, tokens_BT)
  sentence_BS = tokens_BT[:, n_dec:]
  is_terminal_BS = (sentence_BS >= 0) & (sentence_BS < static.n_terminals)
  # Prefixes end at the first non-terminal: only the leading run of terminals needs a chart.
  run_B = np.argmin(np.concatenate([is_terminal_BS, np.zeros((b, 1), bool)], 1), axis=1)
  need_B = np.clip(run_B, 1, n_max)
  empty = (np.zeros((b, t), bool), np.zeros((b, t, static.n_terminals), bool),
           np.zeros((b, t), bool))
  return _bucketed(_next_core, grammar, tokens_BT, decorator_ok_B, need_B, n_max, empty)

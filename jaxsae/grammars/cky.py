"""Batched, compiled CKY / inside parsing and prefix viability for any grammar's CNF tables.

`parse` checks full sequences (decorator, sentence, `<eos>`, padding; see `well_formed`) and runs
the inside algorithm (log-space logsumexp) and the Viterbi algorithm over `Grammar.cnf`, then
backtraces the best parse to per-token labels measured in the ORIGINAL grammar: depth,
preterminal, parent and which child of the root's first binary rule holds the token.
`recognise` gives `parse`'s verdicts alone, from boolean charts (cheaper to compile and run), and
`next_terminals` answers prefix viability: after each sentence prefix, which terminals can
follow, and whether the prefix is already a sentence. Both live in `cky_bool.py`.

Chart layout, static tables, format checks and batching: `cky_chart.py`.

Compilation. The compiled cores see only the CNF arrays and static vocabulary ids, unary
pattern and chart size, so grammars that agree on those (e.g. the two Dyck grammars) share a
compilation. When given concrete arrays, `parse`, `recognise` and `next_terminals` group the rows by
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

from jaxsae.grammars import cky_chart
from jaxsae.grammars import pcfg
from jaxsae.grammars import token_check


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


# ------------------------------------------------------------------------------------------------
# Sequence format.


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
  _, ok_B, length_B = cky_chart.format_check(cky_chart.static_tables(grammar),
                                             jnp.asarray(tokens_BT))
  return ok_B, length_B


# ------------------------------------------------------------------------------------------------
# Inside and Viterbi charts, backtrace.


class _Charts(NamedTuple):
  """Charts of a batch; the batch is the minor axis so every vector op runs along it."""

  inside_ILCB: jax.Array  # log inside probability after unary closure
  inside_JKCB: jax.Array
  best_ILCB: jax.Array  # Viterbi score after unary closure
  best_JKCB: jax.Array
  best_pre_ILCB: jax.Array  # Viterbi score before unary closure (binary or lexical top)


def _charts(cnf: pcfg.CNFTables, static: cky_chart.Static, sent_BN: jax.Array) -> _Charts:
  """Inside and Viterbi charts (`sent_BN` holds columns of `lex_logp_CV`, V = no terminal)."""
  b, n_chart = sent_BN.shape
  n_c = cnf.lex_logp_CV.shape[0]
  neg = -jnp.inf
  lex_CV = jnp.concatenate([cnf.lex_logp_CV, jnp.full((n_c, 1), neg, jnp.float32)], axis=1)
  lex_NCB = jnp.transpose(lex_CV[:, sent_BN], (2, 0, 1))
  unary_sum_CC = jnp.asarray(cnf.unary_sum_CC)
  unary_best_CC = jnp.asarray(cnf.unary_best_CC)
  _, left_R, right_R, logp_R, lhs_RC = cky_chart.binary_rules(cnf)

  def close_inside(pre_ICB):
    return cky_chart.unary_close(static, unary_sum_CC, pre_ICB, jnp.add, cky_chart.lse, neg)

  def close_best(pre_ICB):
    return cky_chart.unary_close(static, unary_best_CC, pre_ICB, jnp.add, jnp.max, neg)

  def rule_scores(left_IMCB, right_IMCB):
    return left_IMCB[:, :, left_R] + right_IMCB[:, :, right_R] + logp_R[None, None, :, None]

  left_shape = (n_chart, n_chart + 1, n_c, b)
  right_shape = (2 * n_chart, 2 * n_chart, n_c, b)
  charts = _Charts(*(jnp.full(s, neg, jnp.float32)
                     for s in (left_shape, right_shape, left_shape, right_shape, left_shape)))
  inside_ILCB, inside_JKCB = cky_chart.write(charts.inside_ILCB, charts.inside_JKCB,
                                             close_inside(lex_NCB), 1, n_chart)
  best_ILCB, best_JKCB = cky_chart.write(charts.best_ILCB, charts.best_JKCB, close_best(lex_NCB),
                                         1, n_chart)
  best_pre_ILCB = charts.best_pre_ILCB.at[:, 1].set(lex_NCB)
  charts = _Charts(inside_ILCB, inside_JKCB, best_ILCB, best_JKCB, best_pre_ILCB)

  def phase_step(lo, hi):
    def step(l, c: _Charts) -> _Charts:
      score_IMRB = rule_scores(*cky_chart.split_views(c.inside_ILCB, c.inside_JKCB, l, lo, hi,
                                                      n_chart))
      inside_ICB = close_inside(cky_chart.by_lhs(cky_chart.lse(score_IMRB, axis=1), lhs_RC,
                                                 cky_chart.lse, neg))
      score_IMRB = rule_scores(*cky_chart.split_views(c.best_ILCB, c.best_JKCB, l, lo, hi, n_chart))
      pre_ICB = cky_chart.by_lhs(jnp.max(score_IMRB, axis=1), lhs_RC, jnp.max, neg)
      inside_ILCB, inside_JKCB = cky_chart.write(c.inside_ILCB, c.inside_JKCB, inside_ICB, l,
                                                 n_chart)
      best_ILCB, best_JKCB = cky_chart.write(c.best_ILCB, c.best_JKCB, close_best(pre_ICB), l,
                                             n_chart)
      best_pre_ILCB = jax.lax.dynamic_update_slice(c.best_pre_ILCB, pre_ICB[:, None],
                                                   (0, l, 0, 0))
      return _Charts(inside_ILCB, inside_JKCB, best_ILCB, best_JKCB, best_pre_ILCB)
    return step

  for lo, hi in cky_chart.phases(n_chart):
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
  lhs_R, left_R, right_R, logp_R, _ = cky_chart.binary_rules(cnf)
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


@functools.partial(jax.jit, static_argnames=("static", "n_chart"))
def _parse_core(cnf: pcfg.CNFTables, tokens_BT: jax.Array, *, static: cky_chart.Static,
                n_chart: int) -> ParseResult:
  """`parse` on one chart size N (traced path; also each bucket of the host path)."""
  return cky_chart.in_chunks(lambda x: _parse_rows(cnf, x, static, n_chart), cnf, tokens_BT,
                             n_chart)


def _parse_rows(cnf: pcfg.CNFTables, tokens_BT: jax.Array, static: cky_chart.Static,
                n_chart: int) -> ParseResult:
  b, t = tokens_BT.shape
  n_dec = len(static.decorator_ids)
  _, ok_B, length_B = cky_chart.format_check(static, tokens_BT)
  sent_BN = cky_chart.sentence_tokens(static, tokens_BT, n_chart)
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
      depth=cky_chart.to_positions(labels.depth_N, t, n_dec, -1),
      preterminal=cky_chart.to_positions(labels.preterminal_N, t, n_dec, -1),
      parent=cky_chart.to_positions(labels.parent_N, t, n_dec, -1),
      root_child=cky_chart.to_positions(labels.root_child_N, t, n_dec, -1),
  )


# ------------------------------------------------------------------------------------------------
# Public entry points.


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
  def empty(b, t, length_B):
    minus_BT = np.full((b, t), -1, np.int32)
    neg_B = np.full((b,), -np.inf, np.float32)
    return ParseResult(grammatical=np.zeros((b,), bool), logprob=neg_B, viterbi_logprob=neg_B,
                       length=length_B, depth=minus_BT, preterminal=minus_BT, parent=minus_BT,
                       root_child=minus_BT)
  return cky_chart.full_sequences(_parse_core, grammar, tokens_BT, max_sentence_len, "parse",
                                  empty)

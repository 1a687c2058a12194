"""Boolean CKY charts: recognition (`recognise`) and prefix viability (`next_terminals`).

`recognise` gives `cky.parse`'s verdicts alone from one chart of booleans ("C derives this
span"), without inside or Viterbi scores or a backtrace, so it compiles and runs several times
faster than the parser; `is_grammatical` uses it for PCFGs. `next_terminals` extends the same
chart with follow sets: after each sentence prefix, which terminals can come next, and whether
the prefix is already a sentence. Chart layout, batching and compilation as in `cky.py`
(`cky_chart.py`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grammars import cky_chart
from jaxsae.grammars import pcfg
from jaxsae.grammars import token_check


# ------------------------------------------------------------------------------------------------
# Recognition: boolean exact-span charts (no probabilities, no backtrace).


class _OkTables(NamedTuple):
  reach_CC: jax.Array  # C =>* D by unary rules
  left_R: jax.Array
  right_R: jax.Array
  lhs_RC: jax.Array


def _ok_tables(cnf: pcfg.CNFTables) -> _OkTables:
  _, left_R, right_R, _, lhs_RC = cky_chart.binary_rules(cnf)
  return _OkTables(jnp.isfinite(cnf.unary_sum_CC), left_R, right_R, lhs_RC)


def _ok_close(static: cky_chart.Static, tables: _OkTables, pre_ICB):
  return cky_chart.unary_close(static, tables.reach_CC, pre_ICB, jnp.logical_and, jnp.any, False)


def _ok_base(cnf: pcfg.CNFTables, static: cky_chart.Static, tables: _OkTables,
             sent_BN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`ok[i, l, C]`: C derives the span of length l at i, with the spans of length 1 written."""
  b, n_chart = sent_BN.shape
  n_c = cnf.lex_logp_CV.shape[0]
  lex_CV = jnp.concatenate([jnp.isfinite(cnf.lex_logp_CV), jnp.zeros((n_c, 1), bool)], axis=1)
  lex_NCB = jnp.transpose(lex_CV[:, sent_BN], (2, 0, 1))
  return cky_chart.write(jnp.zeros((n_chart, n_chart + 1, n_c, b), bool),
                         jnp.zeros((2 * n_chart, 2 * n_chart, n_c, b), bool),
                         _ok_close(static, tables, lex_NCB), 1, n_chart)


def _ok_spans(static: cky_chart.Static, tables: _OkTables, ok_ILCB, ok_JKCB, l, lo: int, hi: int,
              n_chart: int):
  """Spans of length l in phase [lo, hi]: `(left split view, ok_ICB, ok_ILCB, ok_JKCB)`."""
  left, right = cky_chart.split_views(ok_ILCB, ok_JKCB, l, lo, hi, n_chart)
  rule_IRB = jnp.any(left[:, :, tables.left_R] & right[:, :, tables.right_R], axis=1)
  ok_ICB = ok_ILCB[:left.shape[0], l] | _ok_close(
      static, tables, cky_chart.by_lhs(rule_IRB, tables.lhs_RC, jnp.any, False))
  ok_ILCB, ok_JKCB = cky_chart.write(ok_ILCB, ok_JKCB, ok_ICB, l, n_chart)
  return left, ok_ICB, ok_ILCB, ok_JKCB


@functools.partial(jax.jit, static_argnames=("static", "n_chart"))
def _recognise_core(cnf: pcfg.CNFTables, tokens_BT: jax.Array, *, static: cky_chart.Static,
                    n_chart: int) -> jax.Array:
  """`recognise` on one chart size N (traced path; also each bucket of the host path)."""
  return cky_chart.in_chunks(lambda x: _recognise_rows(cnf, x, static, n_chart), cnf, tokens_BT,
                             n_chart)


def _recognise_rows(cnf: pcfg.CNFTables, tokens_BT: jax.Array, static: cky_chart.Static,
                    n_chart: int) -> jax.Array:
  _, ok_B, length_B = cky_chart.format_check(static, tokens_BT)
  sent_BN = cky_chart.sentence_tokens(static, tokens_BT, n_chart)
  tables = _ok_tables(cnf)
  charts = _ok_base(cnf, static, tables, sent_BN)

  def phase_step(lo, hi):
    def step(l, c):
      return _ok_spans(static, tables, *c, l, lo, hi, n_chart)[2:]
    return step

  for lo, hi in cky_chart.phases(n_chart):
    charts = jax.lax.fori_loop(lo, hi + 1, phase_step(lo, hi), charts)
  derives_B = charts[0][0, jnp.clip(length_B, 0, n_chart), 0, jnp.arange(tokens_BT.shape[0])]
  return ok_B & (length_B <= n_chart) & derives_B


# ------------------------------------------------------------------------------------------------
# Prefix viability.


class _PrefixCharts(NamedTuple):
  """Boolean prefix charts of a batch (batch minor, as `_Charts`)."""

  ok_ILCB: jax.Array  # the span derives exactly from C
  ok_JKCB: jax.Array
  follow_JKCKB: jax.Array  # F: C derives the span followed by a terminal of class K
  start_follow_LKB: jax.Array  # F[l, 0, S]: what may follow the sentence prefix of length l
  start_ok_LB: jax.Array  # ok[l, 0, S]: the prefix of length l is a sentence


def _prefix_charts(cnf: pcfg.CNFTables, static: cky_chart.Static,
                   sent_BN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For prefixes of length l = 0..N: classes that can follow (F[l, 0, S]) and completeness."""
  b, n_chart = sent_BN.shape
  n_c = cnf.lex_logp_CV.shape[0]
  first_CK = jnp.asarray(cnf.first_CK)
  n_k = first_CK.shape[1]
  corner_CC = jnp.asarray(cnf.left_corner_CC)
  tables = _ok_tables(cnf)
  first_RK = first_CK[tables.right_R]
  ok_ILCB, ok_JKCB = _ok_base(cnf, static, tables, sent_BN)
  charts = _PrefixCharts(
      ok_ILCB, ok_JKCB, jnp.zeros((2 * n_chart, 2 * n_chart, n_c, n_k, b), bool),
      jnp.zeros((n_chart + 1, n_k, b), bool).at[0].set(
          jnp.broadcast_to(first_CK[0][:, None], (n_k, b))),
      jnp.zeros((n_chart + 1, b), bool))

  def phase_step(lo, hi):
    def step(l, c: _PrefixCharts) -> _PrefixCharts:
      # Exact spans of length l (length 1 is the lexical base, already written).
      left, ok_ICB, ok_ILCB, ok_JKCB = _ok_spans(static, tables, c.ok_ILCB, c.ok_JKCB, l, lo, hi,
                                                 n_chart)
      # B -> X Y straddles the prefix end: X covers the whole span and Y starts with K, or
      # X covers its first m tokens and Y covers the rest followed by K.
      _, follow = cky_chart.split_views(c.follow_JKCKB, c.follow_JKCKB, l, lo, hi, n_chart)
      straddle_IRKB = (ok_ICB[:, tables.left_R, None, :] & first_RK[None, :, :, None]) | jnp.any(
          left[:, :, tables.left_R, None, :] & follow[:, :, tables.right_R], axis=1)
      g_ICKB = jnp.any(tables.lhs_RC[None, :, :, None, None] & straddle_IRKB[:, :, None], axis=1)
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
  for lo, hi in [(1, 1)] + cky_chart.phases(n_chart):
    charts = jax.lax.fori_loop(lo, hi + 1, phase_step(lo, hi), charts)
  return charts.start_follow_LKB, charts.start_ok_LB


@functools.partial(jax.jit, static_argnames=("static", "n_chart"))
def _next_core(cnf: pcfg.CNFTables, tokens_BT: jax.Array, *, static: cky_chart.Static,
               n_chart: int):
  """`next_terminals` on one chart size N (traced path; also each bucket of the host path)."""
  return cky_chart.in_chunks(lambda x: _next_rows(cnf, x, static, n_chart), cnf, tokens_BT, n_chart)


def _next_rows(cnf: pcfg.CNFTables, tokens_BT: jax.Array, static: cky_chart.Static, n_chart: int):
  t = tokens_BT.shape[1]
  n_dec = len(static.decorator_ids)
  decorator_ok_B, _, _ = cky_chart.format_check(static, tokens_BT)
  sent_BN = cky_chart.sentence_tokens(static, tokens_BT, n_chart)
  follow_LKB, complete_LB = _prefix_charts(cnf, static, sent_BN)
  follow_BLK, complete_BL = jnp.transpose(follow_LKB, (2, 0, 1)), complete_LB.T
  class_terms_KV = jnp.asarray(cnf.class_terms_KV)
  next_BLV = jnp.any(follow_BLK[:, :, :, None] & class_terms_KV[None, None], axis=2)
  viable_BL = jnp.any(follow_BLK, axis=2) | complete_BL
  # Prefix length l ends at position 6 + l: row l = 0 is the empty prefix at `Out:`.
  viable_BT = cky_chart.to_positions(viable_BL, t, n_dec - 1, False) & decorator_ok_B[:, None]
  next_BTV = cky_chart.to_positions(next_BLV, t, n_dec - 1, False) & decorator_ok_B[:, None, None]
  complete_BT = cky_chart.to_positions(complete_BL, t, n_dec - 1, False) & decorator_ok_B[:, None]
  return viable_BT, next_BTV, complete_BT


# ------------------------------------------------------------------------------------------------
# Public entry points.


def recognise(grammar: pcfg.Grammar, tokens_BT: jax.Array, *,
              max_sentence_len: int | None = None) -> jax.Array:
  """bool [B]: `cky.parse(...).grammatical` from boolean charts alone (works inside `jax.jit`).

  Same verdicts as `cky.parse` (decorator, `<eos>`, padding, and the start symbol deriving the
  sentence), without probabilities or labels: one boolean chart instead of two float charts
  and a backtrace, so it compiles and runs faster. Bucketing and `max_sentence_len` as in
  `cky.parse`.

  Raises:
    TypeError / ValueError: as `cky.parse`.
  """
  return cky_chart.full_sequences(_recognise_core, grammar, tokens_BT, max_sentence_len,
                                  "recognise", lambda b, t, length_B: np.zeros((b,), bool))


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
  n_max = cky_chart.default_len(max_sentence_len, t - n_dec)
  static = cky_chart.static_tables(grammar)
  if cky_chart.is_traced(tokens_BT, grammar.cnf):
    return _next_core(grammar.cnf, jnp.asarray(tokens_BT, jnp.int32), static=static,
                      n_chart=n_max)
  tokens_BT = np.asarray(tokens_BT).astype(np.int32)
  decorator_ok_B, _, _ = cky_chart.format_check(static, tokens_BT)
  sentence_BS = tokens_BT[:, n_dec:]
  is_terminal_BS = (sentence_BS >= 0) & (sentence_BS < static.n_terminals)
  # Prefixes end at the first non-terminal: only the leading run of terminals needs a chart.
  run_B = np.argmin(np.concatenate([is_terminal_BS, np.zeros((b, 1), bool)], 1), axis=1)
  need_B = np.clip(run_B, 1, n_max)
  empty = (np.zeros((b, t), bool), np.zeros((b, t, static.n_terminals), bool),
           np.zeros((b, t), bool))
  return cky_chart.bucketed(_next_core, grammar, tokens_BT, decorator_ok_B, need_B, n_max, empty)

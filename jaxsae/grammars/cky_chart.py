"""Chart machinery shared by the CKY parser (`cky.py`), recogniser and prefix viability
(`cky_bool.py`).

What the compiled cores need besides the algorithms themselves: the hashable static tables
(`Static`: vocabulary ids and the unary-chain pattern, read from the rule text), the sequence
format check, sentence-position helpers, the chart slicing of the two span layouts, the CNF rule
tables in the orders the charts read them, and batching (`in_chunks` under `jax.jit`,
`bucketed` by chart size on the host, `full_sequences` choosing between them).

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
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grammars import pcfg
from jaxsae.grammars import rules as rules_lib
from jaxsae.grammars import token_check

_BUCKETS = (8, 16, 32, 64)
# Chart elements (rows * N^2 * C) per compiled call on the host-bucketed path: bounds memory
# (~11 such float tables per sentence) while keeping batches large enough to vectorise well.
_CHUNK_ELEMENTS = 1 << 20
_MAX_CHUNK_ROWS = 1024
_MIN_CHUNK_ROWS = 8


# ------------------------------------------------------------------------------------------------
# Static tables.


class Static(NamedTuple):
  """What the compiled cores need at trace time (hashable): vocabulary ids, unary pattern."""

  n_terminals: int
  eos_id: int
  pad_id: int
  decorator_ids: tuple[int, ...]
  unary_targets: tuple[int, ...]  # nonterminals A with A =>+ B for some B != A
  unary_sources: tuple[tuple[int, ...], ...]  # those B, per target, padded with -1


@functools.lru_cache(maxsize=None)
def unary_pattern(info: pcfg.GrammarInfo):
  """Pairs A =>+ B of unary chains, from the rule text (static even when the tables are traced).

  Unary rules only join original nonterminals, whose CNF ids are their `info.nonterminals` ids.
  """
  rules, _ = rules_lib.parse_rules(info.text)
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


def static_tables(grammar: pcfg.Grammar) -> Static:
  """The grammar's `Static` (hashable: a static argument of the compiled cores)."""
  targets, sources = unary_pattern(grammar.info)
  return Static(grammar.n_terminals, grammar.eos_id, grammar.pad_id, grammar.decorator_ids,
                targets, sources)


def unary_close(static: Static, weight_CC, pre_ICB, times, reduce, zero):
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
# Sequence format and sentence positions.


def format_check(static: Static, tokens_BT):
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


def sentence_tokens(static: Static, tokens_BT, n_chart: int):
  """Tokens at sentence positions 7..7+N, as lexical-table columns: non-terminals -> V."""
  n_dec = len(static.decorator_ids)
  sent = tokens_BT[:, n_dec:n_dec + n_chart]
  short = n_chart - sent.shape[1]
  if short > 0:
    sent = jnp.pad(sent, ((0, 0), (0, short)), constant_values=-1)
  is_terminal = (sent >= 0) & (sent < static.n_terminals)
  return jnp.where(is_terminal, sent, static.n_terminals).astype(jnp.int32)


def to_positions(x_BN, t: int, n_dec: int, fill):
  """Places per-sentence-position values [B, N] at sequence positions 7.. of a [B, T] array."""
  width = min(x_BN.shape[1], t - n_dec)
  out = jnp.full((x_BN.shape[0], t) + x_BN.shape[2:], fill, x_BN.dtype)
  return out.at[:, n_dec:n_dec + width].set(x_BN[:, :width])


# ------------------------------------------------------------------------------------------------
# Chart slicing shared by the inside/Viterbi and prefix charts.


def phases(n_chart: int) -> list[tuple[int, int]]:
  """Splits span lengths 2..N into up to 4 contiguous ranges (lo, hi) with static widths."""
  n_phases = 1 if n_chart <= 8 else 2 if n_chart <= 16 else 4
  bounds = sorted({2} | {max(2, round(n_chart * k / n_phases)) + 1 for k in range(1, n_phases)}
                  | {n_chart + 1})
  return [(lo, hi - 1) for lo, hi in zip(bounds[:-1], bounds[1:]) if lo <= hi - 1]


def split_views(left_ILX, right_JKX, l, lo: int, hi: int, n_chart: int):
  """Children of every span of length l (in phase lo..hi): [I, M, ...] left and right tables.

  Row i, column m holds span (i, m) on the left and span (i + m, l - m) on the right; entries
  with m = 0 or m >= l read a length <= 0 and are -inf / False.
  """
  width_i, width_m = n_chart - lo + 1, hi
  left = left_ILX[:width_i, :width_m]
  start = (l, n_chart - l) + (0,) * (right_JKX.ndim - 2)
  right = jax.lax.dynamic_slice(right_JKX, start, (width_i, width_m) + right_JKX.shape[2:])
  return left, right


def write(left_ILX, right_JKX, new_IX, l, n_chart: int):
  """Stores the new spans of length l (rows i < width) in both layouts."""
  zeros = (0,) * (new_IX.ndim - 1)
  left_ILX = jax.lax.dynamic_update_slice(left_ILX, new_IX[:, None], (0, l) + zeros)
  right_JKX = jax.lax.dynamic_update_slice(right_JKX, new_IX[:, None], (l, n_chart - l) + zeros)
  return left_ILX, right_JKX


def lse(x, axis: int):
  """logsumexp that returns -inf (not nan) when every entry is -inf."""
  mx = jnp.max(x, axis=axis, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  return jnp.log(jnp.sum(jnp.exp(x - mx), axis=axis)) + jnp.squeeze(mx, axis)


def binary_rules(cnf: pcfg.CNFTables):
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


def by_lhs(x_IRB, lhs_RC, reduce, fill):
  """Reduces rule scores [I, R, B] over rules with the same left-hand side: [I, C, B]."""
  return reduce(jnp.where(lhs_RC[None, :, :, None], x_IRB[:, :, None, :], fill), axis=1)


# ------------------------------------------------------------------------------------------------
# Batching: chunks of rows (traced), buckets of chart sizes (host).


def chunk_rows(n_chart: int, n_c: int) -> int:
  """Rows per chart batch: a power of two with about `_CHUNK_ELEMENTS` chart cells."""
  rows = _CHUNK_ELEMENTS // (n_chart * n_chart * n_c)
  rows = 1 << max(0, rows.bit_length() - 1)
  return int(np.clip(rows, _MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS))


def in_chunks(rows_fn, cnf: pcfg.CNFTables, tokens_BT: jax.Array, n_chart: int):
  """Applies `rows_fn` to chunks of rows in sequence (`lax.map`).

  Memory then stays bounded however large the batch, and each chunk's charts stay cache-sized.
  """
  b, t = tokens_BT.shape
  rows = chunk_rows(n_chart, cnf.lex_logp_CV.shape[0])
  if b <= rows:
    return rows_fn(tokens_BT)
  n = -(-b // rows)
  padded = jnp.pad(tokens_BT, ((0, n * rows - b), (0, 0)), constant_values=-1)
  out = jax.lax.map(rows_fn, padded.reshape(n, rows, t))
  return jax.tree.map(lambda x: x.reshape((n * rows,) + x.shape[2:])[:b], out)


def is_traced(*trees) -> bool:
  """Whether any leaf of `trees` is a tracer (then the host-side bucketing cannot run)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def bucketed(core, grammar: pcfg.Grammar, tokens_BT: np.ndarray, rows_B: np.ndarray,
             need_B: np.ndarray, n_max: int, empty_outputs):
  """Runs `core` on rows grouped by the chart size they need; scatters results back in order.

  Args:
    core: a compiled core `(cnf, tokens, static=, n_chart=) -> pytree of [b, ...] arrays`.
    rows_B: bool, rows worth parsing (the others keep `empty_outputs`).
    need_B: chart size each row needs (<= n_max).
    empty_outputs: pytree of numpy [B, ...] arrays holding the answers for skipped rows.
  """
  static = static_tables(grammar)
  n_c = grammar.cnf.lex_logp_CV.shape[0]
  sizes = [s for s in _BUCKETS if s < n_max] + [n_max]
  filler = np.full((1, tokens_BT.shape[1]), static.pad_id, tokens_BT.dtype)
  pending = []
  lower = 0
  for size in sizes:
    idx = np.nonzero(rows_B & (need_B > lower) & (need_B <= size))[0]
    lower = size
    chunk = chunk_rows(size, n_c)
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


def default_len(max_sentence_len: int | None, default: int) -> int:
  """The chart size: `max_sentence_len`, else `default`; raises ValueError if below 1."""
  n = default if max_sentence_len is None else int(max_sentence_len)
  if n < 1:
    raise ValueError(f"max_sentence_len must be >= 1, got {n}: pass a positive chart size, or "
                     "sequences long enough to hold the 7-token decorator and a sentence")
  return n


def full_sequences(core, grammar: pcfg.Grammar, tokens_BT, max_sentence_len: int | None,
                   where: str, empty):
  """Runs a full-sequence core: one chart of the maximum size on traced tokens, else the rows
  bucketed by sentence length; `empty(b, t, length_B)` answers the rows that are not parsed."""
  tokens_BT = token_check.check(grammar, tokens_BT, where=where)
  t = tokens_BT.shape[1]
  n_max = default_len(max_sentence_len, t - len(pcfg.DECORATOR) - 1)
  static = static_tables(grammar)
  if is_traced(tokens_BT, grammar.cnf):
    return core(grammar.cnf, jnp.asarray(tokens_BT, jnp.int32), static=static, n_chart=n_max)
  tokens_BT = np.asarray(tokens_BT).astype(np.int32)
  _, ok_B, length_B = format_check(static, tokens_BT)
  rows_B = ok_B & (length_B <= n_max)
  return bucketed(core, grammar, tokens_BT, rows_B, length_B, n_max,
                  empty(tokens_BT.shape[0], t, length_B))

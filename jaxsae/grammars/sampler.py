"""Compiled, batched PCFG sampling in the spec's sequence format.

The sampler is a leftmost-derivation stack machine run for many sentences at once inside one
`lax.while_loop`. A fixed pool of `lanes` works through the requested batch: each lane holds one
sentence in progress (a fixed-size symbol stack) and, per iteration, expands the nonterminal on
top of its stack and then emits the run of terminals / preterminal words now on top. A lane
that finishes starts the next unassigned sentence, so lanes stay busy however unequal the
sentence lengths are.

Sentence `s` of a batch depends on (key, s) alone, so it is the same whatever the batch size or
lane count. Its random numbers come from a counter-based hash (two rounds of the murmur3
finaliser) of the key's data, the sentence index, the iteration and the draw: a pure function of
the key, 2–2.5× cheaper per draw than two threefry calls, which dominated the sampler's cost.
The statistical tests check the output against the exact length distribution of every grammar. A draw whose full sequence would exceed `max_len - 10` tokens is
rejected and redrawn (spec); the machine rejects as soon as the emitted tokens plus the minimum
yield of the pending stack exceed the budget, which changes no probabilities (the accepted
draws are exactly those that would have fit). Slots are assigned when a sentence starts, never
when it ends, so the batch is not biased towards short sentences.
"""

from __future__ import annotations

import functools

import chex
import flax.struct
import jax
import jax.numpy as jnp

from jaxsae.grammars import pcfg

# Tokens reserved after the sentence: `<eos>` plus the spec's margin of 10 (max_len - 10).
MARGIN = 10


@flax.struct.dataclass
class Batch:
  """A batch of sequences in the spec's format.

  Attributes:
    tokens: int32 [B, T]: decorator (7 tokens), sentence, `<eos>`, `<pad>`...
    sentence_mask: bool [B, T], True at sentence positions (not decorator, `<eos>` or pad).
    lengths: int32 [B], sentence lengths.
    rejections: int32 [B], draws rejected by the length filter before each accepted one.
  """

  tokens: jax.Array
  sentence_mask: jax.Array
  lengths: jax.Array
  rejections: jax.Array


def max_sentence_len(max_len: int) -> int:
  """Longest sentence that fits: 7 decorator tokens + sentence + `<eos>` <= max_len - 10."""
  return max_len - MARGIN - len(pcfg.DECORATOR) - 1


def min_max_len(grammar: pcfg.Grammar) -> int:
  """The smallest `max_len` that fits the grammar's shortest sentence.

  7 decorator tokens + the shortest sentence + `<eos>` + the 10-token margin (`MARGIN`).
  """
  return grammar.info.min_length + MARGIN + len(pcfg.DECORATOR) + 1


# Which tokens are selected (an SAE trains on, is evaluated and analysed on): the sentence tokens,
# or every non-pad position.
POSITIONS = ("sentence", "all")


def selected_mask(grammar: pcfg.Grammar, batch: Batch, positions: str,
                  length: int | None = None) -> jax.Array:
  """The selected tokens of a batch: bool `[B, length]`.

  Args:
    grammar: the batch's grammar.
    batch: from `sample`.
    positions: 'sentence' (`batch.sentence_mask`: not the decorator, `<eos>` or padding) or
      'all' (every position that is not `<pad>`).
    length: keep the first `length` positions (e.g. the grid's `forward_len`); default all.

  Raises:
    ValueError: `positions` is not one of `POSITIONS`.
  """
  if positions not in POSITIONS:
    raise ValueError(f"positions={positions!r}: use 'sentence' (sentence tokens) or 'all' "
                     "(every non-pad position).")
  t = batch.tokens.shape[1] if length is None else length
  if positions == "sentence":
    return batch.sentence_mask[:, :t]
  return batch.tokens[:, :t] != grammar.pad_id


def _check_args(grammar: pcfg.Grammar, batch_size: int, max_len: int, lanes: int | None):
  if not isinstance(grammar, pcfg.Grammar):
    raise TypeError(f"expected a jaxsae.grammars Grammar, got {type(grammar).__name__}; "
                    "use jaxsae.grammars.get(name) or from_string(text)")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  shortest = grammar.info.min_length
  if max_sentence_len(max_len) < shortest:
    raise ValueError(
        f"max_len={max_len} leaves room for sentences of at most {max_sentence_len(max_len)} "
        f"tokens, but grammar {grammar.name}'s shortest sentence has {shortest}; "
        f"use max_len >= {min_max_len(grammar)}")
  if lanes is not None and int(lanes) < 1:
    raise ValueError(f"lanes must be >= 1, got {lanes}")


def sample(key: jax.Array, grammar: pcfg.Grammar, batch_size: int, max_len: int = 128, *,
           lanes: int | None = None) -> Batch:
  """Samples `batch_size` sequences of length `max_len` (jit-compiled; works inside jit).

  Args:
    key: a typed PRNG key (`jax.random.key`); the batch is a pure function of it.
    grammar: the grammar to sample from.
    batch_size: number of sequences B (static).
    max_len: sequence length T (static); sentences are at most `max_len - 18` tokens.
    lanes: sentences generated concurrently (static; default min(B, 512)). Affects speed only.

  Returns:
    A `Batch`.
  """
  _check_args(grammar, batch_size, max_len, lanes)
  lanes = min(int(batch_size), int(lanes) if lanes is not None else 512)
  return _sample(key, grammar, int(batch_size), int(max_len), lanes)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample(key, grammar: pcfg.Grammar, batch_size: int, max_len: int, lanes: int) -> Batch:
  tables = grammar.sampler
  n_t = grammar.n_terminals
  max_sent = max_sentence_len(max_len)
  n_l = tables.rule_rhs_ARL.shape[-1]
  k_emit = max(n_l, 4)  # symbols emitted per iteration at most
  stack_size = max_sent + n_l + 1
  start_sym = n_t  # the start symbol is nonterminal 0
  start_min = tables.min_yield_S[start_sym]
  b_total, w = batch_size, lanes
  out_width = max_sent + k_emit

  key_words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)

  def fresh_stack():
    return jnp.zeros((w, stack_size), jnp.int32).at[:, 0].set(start_sym)

  init = dict(
      slot=jnp.arange(w, dtype=jnp.int32),
      next_slot=jnp.int32(w),
      it=jnp.zeros((w,), jnp.int32),
      stack=fresh_stack(),
      sp=jnp.ones((w,), jnp.int32),
      n=jnp.zeros((w,), jnp.int32),
      tmin=jnp.full((w,), start_min, jnp.int32),
      rejections=jnp.zeros((w,), jnp.int32),
      out=jnp.zeros((b_total + 1, out_width), jnp.int32),
      lengths=jnp.zeros((b_total + 1,), jnp.int32),
      rej_out=jnp.zeros((b_total + 1,), jnp.int32),
  )

  def cond(s):
    return jnp.any(s["slot"] < b_total)

  def lane_step(slot, it, stack, sp, tmin):
    """One iteration for one lane: expand the top nonterminal, then emit the top run."""
    u = _uniforms(key_words, slot, it, 1 + k_emit)
    top = stack[jnp.maximum(sp - 1, 0)]
    is_nt = (sp > 0) & (tables.sym_kind_S[top] == 2)
    a = jnp.maximum(top - n_t, 0)
    r = jnp.sum(u[0] >= tables.rule_cum_AR[a]).astype(jnp.int32)
    rhs = tables.rule_rhs_ARL[a, r]
    length = tables.rule_len_AR[a, r]
    j = jnp.arange(n_l)
    # Replace the popped symbol by the right-hand side, reversed (leftmost symbol on top).
    rev = rhs[jnp.clip(length - 1 - j, 0, n_l - 1)]
    pos = jnp.where(is_nt & (j < length), sp - 1 + j, stack_size)  # out of range: dropped
    stack = stack.at[pos].set(rev, mode="drop")
    sp = jnp.where(is_nt, sp - 1 + length, sp)
    tmin = jnp.where(is_nt, tmin + tables.rule_dmin_AR[a, r], tmin)
    # Emit the run of terminals / preterminals on top of the stack (up to k_emit of them).
    e = jnp.arange(k_emit)
    epos = sp - 1 - e
    sym = stack[jnp.clip(epos, 0, stack_size - 1)]
    kind = tables.sym_kind_S[sym]
    run = jnp.cumprod((epos >= 0) & (kind < 2)).astype(jnp.int32)
    count = jnp.sum(run)
    pre = jnp.maximum(sym - n_t, 0)
    word_idx = jnp.sum(u[1:, None] >= tables.word_cum_AW[pre], axis=-1)
    word = tables.word_id_AW[pre, word_idx]
    tokens = jnp.where(kind == 1, word, sym)
    return stack, sp - count, tmin, tokens, run.astype(bool), count

  def body(s):
    stack, sp, tmin, tokens_WK, emit_WK, count = jax.vmap(lane_step)(
        s["slot"], s["it"], s["stack"], s["sp"], s["tmin"])
    active = s["slot"] < b_total
    reject = active & (tmin > max_sent)
    emit_WK = emit_WK & ~reject[:, None]
    row = jnp.minimum(s["slot"], b_total)  # idle lanes write to the spare last row
    col = s["n"][:, None] + jnp.arange(k_emit)[None, :]
    col = jnp.where(emit_WK, col, out_width)  # out of range: dropped
    out = s["out"].at[row[:, None], col].set(tokens_WK, mode="drop")
    n = jnp.where(reject, 0, s["n"] + count)
    done = active & ~reject & (sp == 0)
    lengths = s["lengths"].at[jnp.where(done, row, b_total + 1)].set(n, mode="drop")
    rej_out = s["rej_out"].at[jnp.where(done, row, b_total + 1)].set(s["rejections"], mode="drop")
    # Finished lanes take the next unassigned slots, in lane order.
    rank = jnp.cumsum(done.astype(jnp.int32)) - 1
    new_slot = jnp.where(done, s["next_slot"] + rank, s["slot"])
    restart = done | reject
    stack = stack.at[:, 0].set(jnp.where(restart, start_sym, stack[:, 0]))
    return dict(
        slot=new_slot,
        next_slot=s["next_slot"] + jnp.sum(done.astype(jnp.int32)),
        it=jnp.where(done, 0, s["it"] + 1),
        stack=stack,
        sp=jnp.where(restart, 1, sp),
        n=jnp.where(done, 0, n),
        tmin=jnp.where(restart, start_min, tmin),
        rejections=jnp.where(done, 0, s["rejections"] + reject.astype(jnp.int32)),
        out=out,
        lengths=lengths,
        rej_out=rej_out,
    )

  final = jax.lax.while_loop(cond, body, init)
  lengths = final["lengths"][:b_total]
  sentence_BL = final["out"][:b_total, :max_sent]
  return _assemble(grammar, sentence_BL, lengths, final["rej_out"][:b_total], max_len)


def _fmix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _uniforms(key_words: jax.Array, slot: jax.Array, it: jax.Array, n: int) -> jax.Array:
  """n uniforms in [0, 1) for (sentence `slot`, iteration `it`), a pure function of the key."""
  base = _fmix(key_words[0] ^ _fmix(slot.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
                                    + key_words[-1]))
  ctr = it.astype(jnp.uint32) * jnp.uint32(n) + jnp.arange(n, dtype=jnp.uint32)
  h = _fmix(base ^ (ctr * jnp.uint32(0x85EBCA77) + jnp.uint32(0x27D4EB2F)))
  h = _fmix(h + base)
  return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))  # 24 random bits, exact in f32


def _assemble(grammar: pcfg.Grammar, sentence_BL, lengths_B, rejections_B, max_len) -> Batch:
  """Lays sentences out as decorator + sentence + `<eos>` + padding."""
  n_dec = len(pcfg.DECORATOR)
  pos_T = jnp.arange(max_len)
  decorator = jnp.asarray(grammar.decorator_ids, jnp.int32)
  rel_BT = pos_T[None, :] - n_dec
  in_sentence = (rel_BT >= 0) & (rel_BT < lengths_B[:, None])
  words = jnp.take_along_axis(sentence_BL, jnp.clip(rel_BT, 0, sentence_BL.shape[1] - 1), axis=1)
  tokens = jnp.where(rel_BT == lengths_B[:, None], grammar.eos_id, grammar.pad_id)
  tokens = jnp.where(in_sentence, words, tokens)
  tokens = jnp.where(pos_T[None, :] < n_dec, decorator[jnp.minimum(pos_T, n_dec - 1)][None, :],
                     tokens)
  chex.assert_shape(tokens, (lengths_B.shape[0], max_len))
  return Batch(tokens=tokens.astype(jnp.int32), sentence_mask=in_sentence,
               lengths=lengths_B, rejections=rejections_B)

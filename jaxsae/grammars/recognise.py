"""Sequence-format checks and exact linear-time recognisers for Dyck and Expr.

Every function takes full sequences `tokens_BT` (decorator, sentence, `<eos>`, padding) and is
jit-compatible. A sequence is grammatical iff its decorator is exact, it has an `<eos>`, every
token between the decorator and the first `<eos>` is a terminal, the sentence is not empty,
only `<pad>` follows the `<eos>`, and the sentence is in the language.

The Dyck and Expr scans also return per-token state (depth, stack top, pending operands, ...)
that `labels.py` turns into ground-truth features.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grammars import pcfg
from jaxsae.grammars import token_check
from jaxsae.grammars import token_classes


@flax.struct.dataclass
class Layout:
  """Where the parts of each sequence are.

  Attributes:
    decorator_ok: bool [B], the first 7 tokens are the decorator.
    sentence_len: int32 [B], number of leading terminals after the decorator.
    stops_at_eos: bool [B], the token right after those terminals is `<eos>`.
    padded: bool [B], every token after that `<eos>` is `<pad>`.
    well_formed: bool [B], all of the above and a non-empty sentence.
    sentence_BN: int32 [B, N], the tokens after the decorator (N = T - 7), left-aligned.
  """

  decorator_ok: jax.Array
  sentence_len: jax.Array
  stops_at_eos: jax.Array
  padded: jax.Array
  well_formed: jax.Array
  sentence_BN: jax.Array


def layout(grammar: pcfg.Grammar, tokens_BT: jax.Array) -> Layout:
  """Splits full sequences into decorator / sentence / end and checks the format.

  Raises:
    TypeError / ValueError: `tokens_BT` is not an integer [B, T] array of ids in
      [0, vocab_size) with T >= 9 (`token_check.check`).
  """
  return _layout(grammar, token_check.check(grammar, tokens_BT, where="layout"))


def _layout(grammar: pcfg.Grammar, tokens_BT: jax.Array) -> Layout:
  """`layout` of already validated ids."""
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  n_dec = grammar.prefix_len
  decorator = jnp.asarray(grammar.decorator_ids, jnp.int32)
  decorator_ok = jnp.all(tokens_BT[:, :n_dec] == decorator[None, :], axis=1)
  sentence_BN = tokens_BT[:, n_dec:]
  # Ids < 0 cannot reach here from concrete input (validated); under jit they are not terminals.
  is_term = (sentence_BN >= 0) & (sentence_BN < grammar.n_terminals)
  n = jnp.sum(jnp.cumprod(is_term, axis=1), axis=1).astype(jnp.int32)
  n_cols = sentence_BN.shape[1]
  after = jnp.take_along_axis(sentence_BN, jnp.minimum(n, n_cols - 1)[:, None], axis=1)[:, 0]
  stops_at_eos = (n < n_cols) & (after == grammar.eos_id)
  pos = jnp.arange(n_cols)[None, :]
  padded = jnp.all((pos <= n[:, None]) | (sentence_BN == grammar.pad_id), axis=1)
  well_formed = decorator_ok & stops_at_eos & padded & (n > 0)
  return Layout(decorator_ok, n, stops_at_eos, padded, well_formed, sentence_BN)


# ------------------------------------------------------------------------------------------------
# Dyck.


@flax.struct.dataclass
class DyckScan:
  """Per sentence position (left-aligned, [B, N]) state of the Dyck stack machine."""

  ok: jax.Array  # bool [B, N] the prefix through this token is a viable prefix
  depth_before: jax.Array  # i32 [B, N]
  depth_after: jax.Array  # i32 [B, N]
  top_type_after: jax.Array  # i32 [B, N] type of the bracket on top after the token, -1 if empty
  match_pos: jax.Array  # i32 [B, N] position of the matching bracket, -1 if none (yet)
  bracket_type: jax.Array  # i32 [B, N]
  is_open: jax.Array  # bool [B, N]


def dyck_scan(grammar: pcfg.Grammar, sentence_BN: jax.Array, length_B: jax.Array) -> DyckScan:
  """Runs the bracket stack over each sentence (positions >= length are ignored)."""
  types_np, opens_np = token_classes.bracket_tables(grammar)
  types, opens = jnp.asarray(types_np), jnp.asarray(opens_np)
  n_cols = sentence_BN.shape[1]

  def one(sentence_N, length):
    def step(carry, inp):
      sp, ok, stack_type, stack_pos = carry
      tok, p = inp
      live = p < length
      t = types[jnp.clip(tok, 0, types.shape[0] - 1)]
      op = opens[jnp.clip(tok, 0, opens.shape[0] - 1)]
      top = jnp.maximum(sp - 1, 0)
      closes_ok = (sp > 0) & (stack_type[top] == t)
      match = jnp.where(op, -1, jnp.where(closes_ok, stack_pos[top], -1))
      new_sp = jnp.where(op, sp + 1, jnp.where(closes_ok, sp - 1, sp))
      # Push by scattering to an out-of-range slot (dropped) when not pushing: O(1) per token.
      slot = jnp.where(live & op, sp, n_cols + 1)
      stack_type = stack_type.at[slot].set(t, mode="drop")
      stack_pos = stack_pos.at[slot].set(p, mode="drop")
      new_ok = ok & (op | closes_ok)
      top_after = jnp.where(new_sp > 0, stack_type[jnp.maximum(new_sp - 1, 0)], -1)
      out = (new_ok, sp, new_sp, top_after, match, t, op)
      carry = (jnp.where(live, new_sp, sp), jnp.where(live, new_ok, ok), stack_type, stack_pos)
      return carry, out

    init = (jnp.int32(0), jnp.bool_(True), jnp.zeros((n_cols + 1,), jnp.int32),
            jnp.zeros((n_cols + 1,), jnp.int32))
    _, outs = jax.lax.scan(step, init, (sentence_N, jnp.arange(n_cols, dtype=jnp.int32)))
    ok, before, after, top_after, match, t, op = outs
    # Openers learn their partner's position from the closer that matched them.
    closer_pos = jnp.where(match >= 0, jnp.arange(n_cols), -1)
    partner = jnp.full((n_cols,), -1, jnp.int32).at[jnp.where(match >= 0, match, n_cols)].set(
        closer_pos, mode="drop")
    match = jnp.where(op, partner, match)
    return DyckScan(ok, before, after, top_after, match, t, op)

  return jax.vmap(one)(sentence_BN, length_B)


# ------------------------------------------------------------------------------------------------
# Expr.


@flax.struct.dataclass
class ExprScan:
  """Per sentence position ([B, N], sentence order) state of the expression parser."""

  ok: jax.Array  # bool: the prefix through this token is a viable prefix
  arity: jax.Array  # i32: token class = arity (digit 0, un 1, bin 2, tern 3)
  pending_after: jax.Array  # i32 prefix: operands still needed; postfix: stack size
  eos_legal: jax.Array  # bool: the prefix through this token is a complete expression
  depth: jax.Array  # i32: number of operator ancestors in the expression tree
  arg_slot: jax.Array  # i32: 1-based operand slot in the parent, 0 for the root
  parent_class: jax.Array  # i32: parent's arity (1..3), -1 for the root


def _prefix_tree(arity_BN, length_B):
  """Tree labels of prefix expressions (depth, operand slot, parent arity) by a stack scan."""
  n_cols = arity_BN.shape[1]

  def one(arity_N, length):
    def step(carry, inp):
      sp, rem, cls = carry
      a, p = inp
      live = p < length
      top = jnp.maximum(sp - 1, 0)
      has_parent = sp > 0
      parent = jnp.where(has_parent, cls[top], -1)
      slot = jnp.where(has_parent, cls[top] - rem[top] + 1, 0)
      depth = sp
      rem2 = jnp.where(has_parent, rem.at[top].add(-1), rem)
      # Push an operator; after an operand, close every finished operator on top.
      rem2 = jnp.where(a > 0, rem2.at[sp].set(a, mode="drop"), rem2)
      cls2 = jnp.where(a > 0, cls.at[sp].set(a, mode="drop"), cls)
      sp_push = jnp.where(a > 0, sp + 1, sp)
      idx = jnp.arange(n_cols + 1)
      open_ops = (idx < sp_push) & (rem2 > 0)
      sp2 = jnp.where(a > 0, sp_push, jnp.max(jnp.where(open_ops, idx, -1)) + 1)
      carry = jax.tree.map(lambda new, old: jnp.where(live, new, old), (sp2, rem2, cls2), carry)
      return carry, (depth, slot, parent)

    init = (jnp.int32(0), jnp.zeros((n_cols + 1,), jnp.int32), jnp.zeros((n_cols + 1,), jnp.int32))
    _, outs = jax.lax.scan(step, init, (arity_N, jnp.arange(n_cols, dtype=jnp.int32)))
    return outs

  return jax.vmap(one)(arity_BN, length_B)


def expr_scan(grammar: pcfg.Grammar, sentence_BN: jax.Array, length_B: jax.Array, *,
              tree: bool = True) -> ExprScan:
  """Recognises and labels prefix or postfix expressions (by `grammar.kind`).

  With `tree=False` the tree labels (depth, arg_slot, parent_class; an O(N) scan per
  sequence) are skipped and left as zeros: recognition needs only the counters.
  """
  arities = jnp.asarray(token_classes.arity_table(grammar))
  n_cols = sentence_BN.shape[1]
  pos_N = jnp.arange(n_cols)
  live_BN = pos_N[None, :] < length_B[:, None]
  arity_BN = jnp.where(live_BN, arities[jnp.clip(sentence_BN, 0, arities.shape[0] - 1)], 0)
  if grammar.kind == "expr_prefix":
    # pending = operands still needed; a token is allowed only while some are needed.
    pending = 1 + jnp.cumsum(arity_BN - 1, axis=1)
    pending_before = pending - (arity_BN - 1)
    ok = jnp.cumprod(pending_before > 0, axis=1).astype(bool)
    eos_legal = ok & (pending == 0)
    if not tree:
      zeros = jnp.zeros_like(arity_BN)
      return ExprScan(ok, arity_BN, pending, eos_legal, zeros, zeros, zeros)
    depth, slot, parent = _prefix_tree(arity_BN, length_B)
    return ExprScan(ok, arity_BN, pending, eos_legal, depth, slot, parent)
  if grammar.kind != "expr_postfix":
    raise ValueError(f"expr_scan needs an Expr grammar, got kind '{grammar.kind}'")
  # stack = completed subexpressions; an operator of arity a needs a of them.
  stack = jnp.cumsum(1 - arity_BN, axis=1)
  stack_before = stack - (1 - arity_BN)
  ok = jnp.cumprod(stack_before >= arity_BN, axis=1).astype(bool)
  eos_legal = ok & (stack == 1)
  if not tree:
    zeros = jnp.zeros_like(arity_BN)
    return ExprScan(ok, arity_BN, stack, eos_legal, zeros, zeros, zeros)
  # Reversed postfix is prefix with the operands in reverse order.
  rev_idx = jnp.clip(length_B[:, None] - 1 - pos_N[None, :], 0, n_cols - 1)
  rev_arity = jnp.where(live_BN, jnp.take_along_axis(arity_BN, rev_idx, axis=1), 0)
  depth_r, slot_r, parent_r = _prefix_tree(rev_arity, length_B)
  back = lambda x: jnp.take_along_axis(x, rev_idx, axis=1)
  depth, slot_rev, parent = back(depth_r), back(slot_r), back(parent_r)
  slot = jnp.where(parent > 0, parent + 1 - slot_rev, 0)
  return ExprScan(ok, arity_BN, stack, eos_legal, depth, slot, parent)


# ------------------------------------------------------------------------------------------------
# Verdicts.


def is_grammatical(grammar: pcfg.Grammar, tokens_BT: jax.Array) -> jax.Array:
  """bool [B]: is each full sequence grammatical? Exact for every kind of grammar.

  Dyck and Expr use linear-time scans; any other grammar the boolean CKY recogniser
  (`cky_bool.recognise`).

  Raises:
    TypeError / ValueError: `tokens_BT` is not an integer [B, T] array of ids in
      [0, vocab_size) with T >= 9 (`token_check.check`; under jit only dtype and shape).
  """
  tokens_BT = token_check.check(grammar, tokens_BT, where="is_grammatical")
  lay = _layout(grammar, tokens_BT)
  n = lay.sentence_len
  last = jnp.maximum(n - 1, 0)[:, None]
  if grammar.kind == "dyck":
    scan = dyck_scan(grammar, lay.sentence_BN, n)
    ok = jnp.take_along_axis(scan.ok, last, 1)[:, 0]
    depth = jnp.take_along_axis(scan.depth_after, last, 1)[:, 0]
    return lay.well_formed & ok & (depth == 0)
  if grammar.kind in ("expr_prefix", "expr_postfix"):
    scan = expr_scan(grammar, lay.sentence_BN, n, tree=False)
    return lay.well_formed & jnp.take_along_axis(scan.eos_legal, last, 1)[:, 0]
  from jaxsae.grammars import cky_bool  # pylint: disable=g-import-not-at-top
  return cky_bool.recognise(grammar, tokens_BT)

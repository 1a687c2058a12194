"""Per-token ground-truth features and the sets of grammatical next tokens.

`labels(grammar, tokens)` returns a dict of int32 [B, T] arrays aligned with the tokens. The
convention is uniform: -1 marks positions where a label is undefined (decorator, `<eos>`,
padding, a token after the prefix stopped being viable, or a label that does not apply to this
token, e.g. the conjunction scope of a noun); binary labels are 0/1. `label_info(grammar)`
describes each label (binary / categorical / ordinal, class names) for the analysis code.

`valid_next(grammar, tokens)` gives bool [B, T, V]: `valid[b, t, v]` is True iff
`tokens[b, :t+1] + [v]` is a prefix of some grammatical full sequence (the sequence-length
budget aside). It is exact for every grammar: stack/counter scans for Dyck and Expr, the
CKY prefix chart for other PCFGs. An unviable prefix has no valid next token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grammars import pcfg
from jaxsae.grammars import recognise
from jaxsae.grammars import token_check
from jaxsae.grammars import token_classes


@dataclasses.dataclass(frozen=True)
class LabelInfo:
  """What a label means: 'binary' (0/1), 'categorical' (classes) or 'ordinal' (a count)."""

  kind: str
  classes: tuple[str, ...] = ()
  description: str = ""


_DYCK = {
    "depth_before": LabelInfo("ordinal", description="bracket depth before the token"),
    "depth_after": LabelInfo("ordinal", description="bracket depth after the token"),
    "is_open": LabelInfo("binary", description="the token opens a bracket"),
    "bracket_type": LabelInfo("categorical", ("0", "1"), "bracket type of the token"),
    "top_type_after": LabelInfo(
        "categorical", ("0", "1"), "type of the bracket on top after the token (which closer "
        "is legal next); -1 when the stack is empty"),
    "stack_empty_after": LabelInfo("binary", description="stack empty after the token (<eos> "
                                   "legal)"),
    "match_distance": LabelInfo("ordinal", description="distance to the matching bracket"),
}
_EXPR = {
    "token_class": LabelInfo("categorical", ("digit", "un", "bin", "tern"), "token class"),
    "arity": LabelInfo("ordinal", description="operator arity (digits 0)"),
    "pending_operands": LabelInfo(
        "ordinal", description="prefix: operands still needed after the token; postfix: "
        "completed subexpressions on the stack after the token"),
    "eos_legal": LabelInfo("binary", description="the prefix is a complete expression"),
    "depth": LabelInfo("ordinal", description="operator ancestors in the expression tree"),
    "arg_slot": LabelInfo("categorical", ("root", "1", "2", "3"),
                          "operand slot in the parent operator (0 for the root)"),
    "parent_class": LabelInfo("categorical", ("none", "un", "bin", "tern"),
                              "arity of the parent operator (0 for the root)"),
}
_VERB_CATEGORIES = ("V", "TV", "IV")


def _pcfg_info(grammar: pcfg.Grammar) -> dict[str, LabelInfo]:
  cats = grammar.info.categories
  out = {
      "pos": LabelInfo("categorical", cats, "part of speech (preterminal category)"),
      "depth": LabelInfo("ordinal", description="nonterminal ancestors in the best parse"),
      "in_subject": LabelInfo("binary", description="inside the root's first child (the "
                              "subject NP for English), vs the rest (the VP)"),
      "eos_legal": LabelInfo("binary", description="the prefix is a complete sentence"),
  }
  if any(c in _VERB_CATEGORIES for c in cats):
    out["first_verb"] = LabelInfo("binary", description="verbs only: the first verb of the "
                                  "sentence (1) or a later one (0)")
  if "Conj" in cats:
    out["conj_scope"] = LabelInfo("categorical", ("NP", "VP", "other"),
                                  "conjunctions only: coordination of NPs (0) or VPs (1)")
  return out


def label_info(grammar: pcfg.Grammar) -> dict[str, LabelInfo]:
  """Names and meanings of the labels `labels(grammar, ...)` returns."""
  if grammar.kind == "dyck":
    return dict(_DYCK)
  if grammar.kind in ("expr_prefix", "expr_postfix"):
    return dict(_EXPR)
  return _pcfg_info(grammar)


def _to_full(grammar: pcfg.Grammar, values_BN: jax.Array, defined_BN: jax.Array) -> jax.Array:
  """Sentence-aligned [B, N] values → full-sequence [B, T] with -1 where undefined."""
  vals = jnp.where(defined_BN, values_BN.astype(jnp.int32), -1)
  pad = jnp.full((vals.shape[0], grammar.prefix_len), -1, jnp.int32)
  return jnp.concatenate([pad, vals], axis=1)


def labels(grammar: pcfg.Grammar, tokens_BT: jax.Array) -> dict[str, jax.Array]:
  """Per-token labels (see module docstring and `label_info`).

  Raises:
    TypeError / ValueError: `tokens_BT` is not an integer [B, T] array of ids in
      [0, vocab_size) with T >= 9 (`token_check.check`; under jit only dtype and shape).
  """
  tokens_BT = jnp.asarray(token_check.check(grammar, tokens_BT, where="labels"))
  lay = recognise.layout(grammar, tokens_BT)
  n_cols = lay.sentence_BN.shape[1]
  in_sentence = (jnp.arange(n_cols)[None, :] < lay.sentence_len[:, None]) & lay.decorator_ok[:, None]
  if grammar.kind == "dyck":
    s = recognise.dyck_scan(grammar, lay.sentence_BN, lay.sentence_len)
    defined = in_sentence & s.ok
    dist = jnp.where(s.match_pos >= 0, jnp.abs(s.match_pos - jnp.arange(n_cols)[None, :]), -1)
    raw = {
        "depth_before": s.depth_before, "depth_after": s.depth_after, "is_open": s.is_open,
        "bracket_type": s.bracket_type, "top_type_after": s.top_type_after,
        "stack_empty_after": s.depth_after == 0, "match_distance": dist,
    }
    out = {k: _to_full(grammar, v, defined) for k, v in raw.items()}
    # "Not applicable" entries inside the sentence stay -1.
    out["top_type_after"] = _to_full(grammar, s.top_type_after, defined & (s.top_type_after >= 0))
    out["match_distance"] = _to_full(grammar, dist, defined & (dist >= 0))
    return out
  if grammar.kind in ("expr_prefix", "expr_postfix"):
    s = recognise.expr_scan(grammar, lay.sentence_BN, lay.sentence_len)
    defined = in_sentence & s.ok
    raw = {
        "token_class": s.arity, "arity": s.arity, "pending_operands": s.pending_after,
        "eos_legal": s.eos_legal, "depth": s.depth, "arg_slot": s.arg_slot,
        "parent_class": jnp.maximum(s.parent_class, 0),
    }
    return {k: _to_full(grammar, v, defined) for k, v in raw.items()}
  return _pcfg_labels(grammar, tokens_BT, lay, in_sentence)


def _pcfg_labels(grammar, tokens_BT, lay, in_sentence) -> dict[str, jax.Array]:
  from jaxsae.grammars import cky  # pylint: disable=g-import-not-at-top
  from jaxsae.grammars import cky_bool  # pylint: disable=g-import-not-at-top
  n_dec = grammar.prefix_len
  parsed = cky.parse(grammar, tokens_BT)
  viable_BT, _, complete_BT = cky_bool.next_terminals(grammar, tokens_BT)
  sent = lambda x: jnp.asarray(x)[:, n_dec:]
  gram = parsed.grammatical[:, None] & in_sentence
  viable = sent(viable_BT) & in_sentence
  cat_of = jnp.asarray(token_classes.token_category(grammar))
  pos = cat_of[jnp.clip(lay.sentence_BN, 0, grammar.n_terminals - 1)]
  out = {
      "pos": _to_full(grammar, pos, viable & (pos >= 0)),
      "depth": _to_full(grammar, sent(parsed.depth), gram),
      "in_subject": _to_full(grammar, sent(parsed.root_child) == 0, gram),
      "eos_legal": _to_full(grammar, sent(complete_BT), viable),
  }
  cats = grammar.info.categories
  verb_ids = [i for i, c in enumerate(cats) if c in _VERB_CATEGORIES]
  if verb_ids:
    is_verb = jnp.isin(pos, jnp.asarray(verb_ids)) & viable
    earlier = jnp.cumsum(is_verb, axis=1) - is_verb
    out["first_verb"] = _to_full(grammar, earlier == 0, is_verb)
  if "Conj" in cats:
    names = grammar.info.cnf_names
    parent = sent(parsed.parent)
    scope = jnp.where(parent == names.index("NP"), 0, jnp.where(parent == names.index("VP"), 1, 2))
    is_conj = (pos == cats.index("Conj")) & gram
    out["conj_scope"] = _to_full(grammar, scope, is_conj & (parent >= 0))
  return out


def first_terminals(grammar: pcfg.Grammar) -> np.ndarray:
  """bool [n_terminals]: terminals that can start a sentence."""
  classes = np.asarray(grammar.cnf.first_CK)[0]
  return np.asarray(grammar.cnf.class_terms_KV)[classes].any(axis=0)


def valid_next(grammar: pcfg.Grammar, tokens_BT: jax.Array) -> jax.Array:
  """bool [B, T, V]: which tokens may grammatically follow each prefix (module docstring).

  Raises:
    TypeError / ValueError: as `labels`.
  """
  tokens_BT = jnp.asarray(token_check.check(grammar, tokens_BT, where="valid_next"))
  lay = recognise.layout(grammar, tokens_BT)
  b, t = tokens_BT.shape
  n_dec, n_t, v = grammar.prefix_len, grammar.n_terminals, grammar.vocab_size
  n = lay.sentence_len
  n_cols = t - n_dec
  pos_N = jnp.arange(n_cols)[None, :]
  live = pos_N < n[:, None]

  # Language part, per sentence position p: viable prefix?, next terminals, complete?
  if grammar.kind == "dyck":
    s = recognise.dyck_scan(grammar, lay.sentence_BN, n)
    types, opens = (jnp.asarray(x) for x in token_classes.bracket_tables(grammar))
    ok, complete = s.ok, s.depth_after == 0
    nxt = opens[None, None, :] | (types[None, None, :] == s.top_type_after[..., None])
  elif grammar.kind in ("expr_prefix", "expr_postfix"):
    s = recognise.expr_scan(grammar, lay.sentence_BN, n, tree=False)
    arity = jnp.asarray(token_classes.arity_table(grammar))
    ok, complete = s.ok, s.eos_legal
    if grammar.kind == "expr_prefix":
      nxt = jnp.broadcast_to((s.pending_after > 0)[..., None], (b, n_cols, n_t))
    else:
      nxt = s.pending_after[..., None] >= arity[None, None, :]
  else:
    from jaxsae.grammars import cky_bool  # pylint: disable=g-import-not-at-top
    viable_BT, next_BTV, complete_BT = cky_bool.next_terminals(grammar, tokens_BT)
    ok, nxt, complete = viable_BT[:, n_dec:], next_BTV[:, n_dec:], complete_BT[:, n_dec:]
  ok = ok & live & lay.decorator_ok[:, None]
  sent_valid = jnp.concatenate(
      [nxt & ok[..., None], (complete & ok)[..., None], jnp.zeros((b, n_cols, v - n_t - 1), bool)],
      axis=-1)
  # Reorder the eos column into place: terminals, then specials with <eos> at its id.
  eos_col = sent_valid[..., n_t]
  sent_valid = jnp.zeros((b, n_cols, v), bool).at[..., :n_t].set(sent_valid[..., :n_t])
  sent_valid = sent_valid.at[..., grammar.eos_id].set(eos_col)

  # After a complete sentence and its <eos>: only padding, as long as only padding came.
  last = jnp.maximum(n - 1, 0)[:, None]
  finished = (lay.decorator_ok & lay.stops_at_eos & (n > 0)
              & jnp.take_along_axis(complete & ok, last, 1)[:, 0])
  tail_ok = jnp.cumprod((pos_N <= n[:, None]) | (lay.sentence_BN == grammar.pad_id), axis=1)
  after = finished[:, None] & (pos_N >= n[:, None]) & tail_ok.astype(bool)
  pad_row = jax.nn.one_hot(grammar.pad_id, v, dtype=bool)
  sent_valid = jnp.where(after[..., None], pad_row[None, None, :], sent_valid)

  # Decorator part.
  decorator = jnp.asarray(grammar.decorator_ids, jnp.int32)
  dec_prefix_ok = jnp.cumprod(tokens_BT[:, :n_dec] == decorator[None, :], axis=1).astype(bool)
  nxt_dec = jax.nn.one_hot(jnp.concatenate([decorator[1:], jnp.zeros((1,), jnp.int32)]), v,
                           dtype=bool)
  first = jnp.zeros((v,), bool).at[:n_t].set(jnp.asarray(first_terminals(grammar)))
  nxt_dec = nxt_dec.at[n_dec - 1].set(first)
  dec_valid = dec_prefix_ok[..., None] & nxt_dec[None]
  return jnp.concatenate([dec_valid, sent_valid], axis=1)

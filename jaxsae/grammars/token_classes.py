"""Token classes of a grammar's vocabulary, read from its terminal names and lexical rules.

Per-terminal tables (NumPy, indexed by terminal id):

    bracket_tables   Dyck: bracket type k of o{k}/c{k}, and whether the terminal opens;
    arity_table      Expr: digit 0, unary 1, binary 2, ternary 3;
    token_category   PCFGs with parts of speech: index into `info.categories` (-1 if none).

Over the whole vocabulary (terminals, `<eos>`, ...):

    family           'dyck', 'expr' or 'english' (every other PCFG);
    token_classes    named classes and their bool membership [C, V] for the family.

The recognisers (`recognise.py`), the labels (`features.py`), the corpus survey and the
intervention outcomes (`jaxsae.analysis`) all read token classes from here.
"""

from __future__ import annotations

import numpy as np

from jaxsae.grammars import pcfg


def bracket_tables(grammar: pcfg.Grammar) -> tuple[np.ndarray, np.ndarray]:
  """Per terminal of a Dyck grammar: its bracket type and whether it opens.

  Args:
    grammar: a grammar whose terminals are named o<k> / c<k>.

  Returns:
    (types int32 [n_terminals], the k of o{k}/c{k}; opens bool [n_terminals]).

  Raises:
    ValueError: a terminal is not named o<k> / c<k>.
  """
  types, opens = [], []
  for t in grammar.info.terminals:
    if len(t) < 2 or t[0] not in "oc" or not t[1:].isdigit():
      raise ValueError(f"grammar {grammar.name} of kind 'dyck' has terminal '{t}'; Dyck "
                       "terminals must be named o<k> / c<k>")
    types.append(int(t[1:]))
    opens.append(t[0] == "o")
  return np.array(types, np.int32), np.array(opens, bool)


def arity_table(grammar: pcfg.Grammar) -> np.ndarray:
  """Per terminal of an Expr grammar: its class / arity (digit 0, unary 1, binary 2, ternary 3).

  Args:
    grammar: a grammar whose terminals are named dig<k> / un<k> / bin<k> / tern<k>.

  Returns:
    int32 [n_terminals].

  Raises:
    ValueError: a terminal has another name.
  """
  prefixes = {"dig": 0, "un": 1, "bin": 2, "tern": 3}
  out = []
  for t in grammar.info.terminals:
    stem = t.rstrip("0123456789")
    if stem not in prefixes:
      raise ValueError(f"grammar {grammar.name} of kind '{grammar.kind}' has terminal '{t}'; "
                       "Expr terminals must be dig<k> / un<k> / bin<k> / tern<k>")
    out.append(prefixes[stem])
  return np.array(out, np.int32)


def token_category(grammar: pcfg.Grammar) -> np.ndarray:
  """Per terminal: its part of speech, from the grammar's lexical rules.

  Returns:
    int32 [n_terminals]: the index into `grammar.info.categories` of the one category whose
    lexical rules produce the terminal; -1 if none or several do.
  """
  lex = np.isfinite(np.asarray(grammar.cnf.lex_logp_CV))
  names = grammar.info.cnf_names
  out = np.full((grammar.n_terminals,), -1, np.int32)
  for v in range(grammar.n_terminals):
    cats = [grammar.info.categories.index(names[c]) for c in np.nonzero(lex[:, v])[0]
            if names[c] in grammar.info.categories]
    if len(cats) == 1:
      out[v] = cats[0]
  return out


def family(grammar: pcfg.Grammar) -> str:
  """The grammar's family: 'dyck', 'expr' or 'english' (other PCFGs).

  It picks the token classes (`token_classes`) and keys `causality.EXPECTED_EFFECTS`.
  """
  if grammar.kind == "dyck":
    return "dyck"
  if grammar.kind in ("expr_prefix", "expr_postfix"):
    return "expr"
  return "english"


def token_classes(grammar: pcfg.Grammar) -> tuple[tuple[str, ...], np.ndarray]:
  """Named token classes and their bool membership `[C, V]` (classes may overlap).

  Dyck: eos, open, close, open{k}, close{k} per bracket type k. Expr: eos, digit, op (any
  operator), un, bin, tern. English and other PCFGs: eos and each preterminal category (part of
  speech), from the grammar's lexical rules.
  """
  v = grammar.vocab_size
  rows: dict[str, np.ndarray] = {"eos": np.arange(v) == grammar.eos_id}

  def terms(sel):
    out = np.zeros((v,), bool)
    out[: grammar.n_terminals] = sel
    return out

  fam = family(grammar)
  if fam == "dyck":
    types, opens = bracket_tables(grammar)
    rows["open"], rows["close"] = terms(opens), terms(~opens)
    for k in np.unique(types):
      rows[f"open{k}"] = terms(opens & (types == k))
    for k in np.unique(types):
      rows[f"close{k}"] = terms(~opens & (types == k))
  elif fam == "expr":
    arity = arity_table(grammar)
    rows["digit"], rows["op"] = terms(arity == 0), terms(arity > 0)
    for a, name in ((1, "un"), (2, "bin"), (3, "tern")):
      rows[name] = terms(arity == a)
  else:
    cat = token_category(grammar)
    for i, name in enumerate(grammar.info.categories):
      rows[name] = terms(cat == i)
  return tuple(rows), np.stack(list(rows.values()))

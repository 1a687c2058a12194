"""The named grammars of the spec (Menon et al. 2025), built from their rule text.

Every grammar here is written out as rules in the same NLTK-style text a user would pass to
`from_text`, so the named grammars and user grammars go through one code path. Word
probabilities inside a preterminal category are uniform (the original drew them from
Dirichlet(1e5·1), i.e. uniform to within 0.1%).
"""

from __future__ import annotations

import functools

from jaxsae.grammars import pcfg
from jaxsae.grammars import rules as rules_lib


def _category(lhs: str, prefix: str, n: int) -> tuple[str, list[str]]:
  words = [f"{prefix}{i}" for i in range(n)]
  return f"{lhs} -> " + " | ".join(f"{w} [{1 / n!r}]" for w in words), words


def dyck_text(p_nest: float) -> str:
  """Dyck-2 rules with nesting probability `p_nest`."""
  q = 1.0 - p_nest
  return "\n".join([
      "S -> S S [0.3] | Brack0 [0.35] | Brack1 [0.35]",
      f"Brack0 -> o0 S c0 [{p_nest!r}] | o0 c0 [{q!r}]",
      f"Brack1 -> o1 S c1 [{p_nest!r}] | o1 c1 [{q!r}]",
                   ])


def dyck(p_nest: float = 0.5, name: str | None = None) -> pcfg.Grammar:
  """Dyck-2 (two bracket types); vocabulary o0, o1, c0, c1 (spec order)."""
  if not 0.0 < p_nest < 1.0:
    raise rules_lib.GrammarError(f"p_nest must lie in (0, 1), got {p_nest}")
  return pcfg.from_text(dyck_text(p_nest), name=name or f"dyck2_p{p_nest:g}", kind="dyck",
                        terminals=["o0", "o1", "c0", "c1"])


def expr_text(order: str) -> str:
  """Expr rules in 'prefix' (operator first) or 'postfix' (operator last) order."""
  if order == "prefix":
    op = "UnOp Expr [0.33] | BinOp Expr Expr [0.33] | TernOp Expr Expr Expr [0.34]"
  elif order == "postfix":
    op = "Expr UnOp [0.33] | Expr Expr BinOp [0.33] | Expr Expr Expr TernOp [0.34]"
  else:
    raise rules_lib.GrammarError(f"Expr order must be 'prefix' or 'postfix', got '{order}'")
  lines = ["S -> Expr [1.0]", "Expr -> OpExpr [0.4] | Digit [0.6]", f"OpExpr -> {op}"]
  for lhs, prefix, n in (("Digit", "dig", 10), ("UnOp", "un", 3), ("BinOp", "bin", 3),
                         ("TernOp", "tern", 3)):
    lines.append(_category(lhs, prefix, n)[0])
  return "\n".join(lines)


def expr(order: str = "prefix") -> pcfg.Grammar:
  """Expr: digits and unary/binary/ternary operators in prefix or postfix notation."""
  terminals = ([f"dig{i}" for i in range(10)] + [f"un{i}" for i in range(3)]
               + [f"bin{i}" for i in range(3)] + [f"tern{i}" for i in range(3)])
  return pcfg.from_text(expr_text(order), name=f"expr_{order}", kind=f"expr_{order}",
                        terminals=terminals)


# Phrase-structure rules of the English grammars (spec, "English" and "English variants").
_ENGLISH_RULES = {
    "main": [
        "S -> NP VP [1.0]",
        "NP -> Adj N [0.5] | NP Conj NP [0.25] | Pro [0.25]",
        "VP -> V [0.25] | V NP [0.35] | VP Adv [0.25] | VP Conj VP [0.15]",
    ],
    "transitive": [
        "S -> NP VP [1.0]",
        "NP -> Pro [0.2] | N [0.2] | NP Conj NP [0.15] | Adj NP [0.45]",
        "VP -> TV NP [0.2] | IV [0.2] | VP Conj VP [0.15] | VP Adv [0.45]",
    ],
    "relative": [
        "S -> NP VP [1.0]",
        "NP -> Pro [0.2] | N [0.21] | NP Conj NP [0.15] | Adj NP [0.22] | NP AdjRel [0.22]",
        "VP -> VP Conj VP [0.15] | VP Adv [0.22] | VP AdvRel [0.22] | V NP [0.2] | V [0.21]",
        "AdjRel -> RP V NP [0.33] | RP V [0.33] | RP NP V [0.34]",
        "AdvRel -> RA S [1.0]",
    ],
    "prep": [
        "S -> NP VP [1.0]",
        "NP -> Pro [0.2] | N [0.21] | NP Conj NP [0.15] | Adj NP [0.22] | NP PP [0.22]",
        "VP -> VP Conj VP [0.15] | VP Adv [0.22] | VP PP [0.22] | V NP [0.2] | V [0.21]",
        "PP -> P NP [1.0]",
    ],
    "pconj03": [
        "S -> NP VP [1.0]",
        "NP -> Pro [0.2] | N [0.2] | NP Conj NP [0.3] | Adj NP [0.3]",
        "VP -> VP Conj VP [0.3] | VP Adv [0.3] | V NP [0.2] | V [0.2]",
    ],
}
# Preterminal categories in vocabulary order: (nonterminal, word prefix, number of words).
_ENGLISH_CATEGORIES = {
    "main": [("N", "noun", 10), ("V", "verb", 10), ("Adj", "adj", 10), ("Pro", "pro", 10),
             ("Adv", "adv", 10), ("Conj", "conj", 10)],
    "transitive": [("N", "noun", 10), ("TV", "tv", 5), ("IV", "iv", 5), ("Adj", "adj", 10),
                   ("Pro", "pro", 10), ("Adv", "adv", 10), ("Conj", "conj", 10)],
    "relative": [("N", "noun", 10), ("V", "verb", 10), ("Adj", "adj", 10), ("Pro", "pro", 10),
                 ("Adv", "adv", 10), ("Conj", "conj", 10), ("RP", "relp", 2), ("RA", "rela", 2)],
    "prep": [("N", "noun", 10), ("V", "verb", 10), ("Adj", "adj", 10), ("Pro", "pro", 10),
             ("Adv", "adv", 10), ("Conj", "conj", 10), ("P", "prep", 3)],
    "pconj03": [("N", "noun", 10), ("V", "verb", 10), ("Adj", "adj", 10), ("Pro", "pro", 10),
                ("Adv", "adv", 10), ("Conj", "conj", 10)],
}


def english_text(variant: str = "main") -> tuple[str, list[str]]:
  """English rules and terminal order for a variant: main, transitive, relative, prep, pconj03."""
  if variant not in _ENGLISH_RULES:
    raise rules_lib.GrammarError(
        f"English variant '{variant}' is unknown; use one of {sorted(_ENGLISH_RULES)}")
  lines = list(_ENGLISH_RULES[variant])
  terminals: list[str] = []
  for lhs, prefix, n in _ENGLISH_CATEGORIES[variant]:
    line, words = _category(lhs, prefix, n)
    lines.append(line)
    terminals += words
  return "\n".join(lines), terminals


def english(variant: str = "main") -> pcfg.Grammar:
  """An English-like PCFG (parts of speech as terminal categories)."""
  text, terminals = english_text(variant)
  name = "english" if variant == "main" else f"english_{variant}"
  return pcfg.from_text(text, name=name, kind="pcfg", terminals=terminals)


_BUILDERS = {
    "dyck2": lambda: dyck(0.5, name="dyck2"),
    "dyck2_p03": lambda: dyck(0.3, name="dyck2_p03"),
    "expr_prefix": lambda: expr("prefix"),
    "expr_postfix": lambda: expr("postfix"),
    "english": lambda: english("main"),
    "english_transitive": lambda: english("transitive"),
    "english_relative": lambda: english("relative"),
    "english_prep": lambda: english("prep"),
    "english_pconj03": lambda: english("pconj03"),
}


def names() -> tuple[str, ...]:
  """Names accepted by `get`."""
  return tuple(_BUILDERS)


@functools.lru_cache(maxsize=None)
def get(name: str) -> pcfg.Grammar:
  """The named grammar (cached: repeated calls return the same object, so jit caches hit)."""
  if name not in _BUILDERS:
    raise KeyError(f"unknown grammar '{name}'; known grammars: {', '.join(_BUILDERS)}")
  return _BUILDERS[name]()

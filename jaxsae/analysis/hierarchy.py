"""Parent / child feature hierarchies over a grammar's exact token labels.

A *family* is a parent binary feature and its children: binary features whose positive tokens
are a subset of the parent's (and that are defined wherever the parent is). The absorption,
splitting and hedging metrics of `ground_truth.py` are computed on families. Each grammar has a
natural hierarchy, built here from the `LabelMatrix` columns that `recovery.label_matrix` makes
of `grammars.labels` (and, for word-level children, the token ids themselves):

- Dyck: "inside brackets" (`depth_after>=1`, the stack is non-empty after the token) → exact
  depths (`depth_after=k`, k = 1, 2, ...);
- Expr (prefix / postfix): each token class (`token_class=un`, ...) → its tokens
  (`token=un0`, ...); digits → `token=dig0` ... likewise;
- PCFGs (English and variants): each part of speech (`pos=N`, ...) → its words
  (`token=noun0`, ...).

Children with fewer than `min_positives` positive tokens are dropped, and so is a family left
with fewer than two children (a lone child equals its parent). All columns of a `Hierarchy` are
binary and live in one `LabelMatrix` over the same M tokens as the codes.

On a hierarchy and an SAE's codes (latents fire when > 0, `firing.py`): `family_latents` (the
parent's and each child's best latent by firing F1), `absorption` (parent tokens where the
parent's latent is silent and a child's latent fires instead) and `hedging` (a child latent's
firing mass on parent-but-not-child tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae import grammars
from jaxsae.analysis import firing
from jaxsae.analysis import recovery

# The categorical label whose classes are split by token identity, per grammar kind.
_CLASS_LABEL = {"expr_prefix": "token_class", "expr_postfix": "token_class"}
_PCFG_CLASS_LABEL = "pos"


@dataclasses.dataclass(frozen=True)
class Family:
  """A parent feature and its child features (column names of `Hierarchy.columns`)."""

  parent: str
  children: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Hierarchy:
  """Families of binary features over M tokens.

  Attributes:
    columns: binary columns of every parent and child (kind 'binary'), over the codes' tokens.
    families: the parent → children structure, parents in column order.
  """

  columns: recovery.LabelMatrix
  families: tuple[Family, ...]

  def to_json(self) -> dict[str, list[str]]:
    """parent → children, JSON-able."""
    return {f.parent: list(f.children) for f in self.families}


def make_hierarchy(lm: recovery.LabelMatrix, families: Mapping[str, Sequence[str]]
                   ) -> Hierarchy:
  """A hierarchy of existing binary columns, after checking that children nest in parents.

  Args:
    lm: label columns; every named column must be binary ('binary' or 'class' kind).
    families: parent column name → child column names.

  Returns:
    A `Hierarchy` whose `columns` are the named columns (parents, then each parent's
    children), in first-use order.

  Raises:
    ValueError: an unknown or non-binary column, a family without children, or a child with
      a positive token where the parent is not positive, or defined where the parent is not.
  """
  if not families:
    raise ValueError("make_hierarchy got no families; pass {parent: [children, ...]}.")
  order: list[str] = []
  for parent, children in families.items():
    if not children:
      raise ValueError(f"family {parent!r} has no children; drop it or name its children.")
    for name in (parent, *children):
      if name not in lm.names:
        raise ValueError(f"column {name!r} is not in the LabelMatrix (columns: {lm.names}).")
      if lm.kinds[lm.names.index(name)] not in recovery.BINARY_KINDS:
        raise ValueError(f"column {name!r} is {lm.kinds[lm.names.index(name)]}; hierarchy "
                         "columns must be binary (threshold ordinal labels first).")
      if name not in order:
        order.append(name)
  for parent, children in families.items():
    p = lm.names.index(parent)
    p_pos = lm.defined[:, p] & (lm.values[:, p] == 1)
    for child in children:
      c = lm.names.index(child)
      c_pos = lm.defined[:, c] & (lm.values[:, c] == 1)
      if np.any(c_pos & ~p_pos):
        raise ValueError(f"child {child!r} is positive on {int(np.sum(c_pos & ~p_pos))} tokens "
                         f"where parent {parent!r} is not; children must nest in the parent.")
      if np.any(lm.defined[:, c] & ~lm.defined[:, p]):
        raise ValueError(f"child {child!r} is defined on tokens where parent {parent!r} is "
                         "not; define children only where the parent is defined.")
  fams = tuple(Family(p, tuple(c)) for p, c in families.items())
  return Hierarchy(columns=lm.select(order), families=fams)


def _binary_matrix(cols: Sequence[tuple[str, np.ndarray, np.ndarray, str]]
                   ) -> recovery.LabelMatrix:
  return recovery.LabelMatrix(
      names=tuple(c[0] for c in cols),
      values=np.stack([np.where(c[2], c[1], 0).astype(np.float32) for c in cols], axis=1),
      defined=np.stack([c[2] for c in cols], axis=1),
      kinds=("binary",) * len(cols), sources=tuple(c[3] for c in cols))


def _depth_families(lm, depth_label, min_positives):
  if depth_label not in lm.names:
    raise ValueError(f"the LabelMatrix has no {depth_label!r} column (columns: {lm.names}); "
                     "build it from grammars.labels of a Dyck grammar.")
  j = lm.names.index(depth_label)
  v, d = lm.values[:, j].astype(np.int64), lm.defined[:, j]
  parent = f"{depth_label}>=1"
  cols = [(parent, (v >= 1), d, depth_label)]
  children = []
  for k in range(1, int(v[d].max(initial=0)) + 1):
    pos = d & (v == k)
    if pos.sum() >= min_positives:
      children.append(f"{depth_label}={k}")
      cols.append((children[-1], v == k, d, depth_label))
  return cols, {parent: children}


def _token_families(grammar, lm, tokens_M, class_label, min_positives):
  cols, families = [], {}
  prefix = f"{class_label}="
  parents = [n for n, s in zip(lm.names, lm.sources) if s == class_label and n.startswith(prefix)]
  if not parents:
    raise ValueError(f"the LabelMatrix has no {class_label!r} class columns (columns: "
                     f"{lm.names}); build it from grammars.labels of grammar {grammar.name}.")
  vocab = grammar.vocab
  for parent in parents:
    j = lm.names.index(parent)
    d = lm.defined[:, j]
    p_pos = d & (lm.values[:, j] == 1)
    children, child_cols = [], []
    for tok in np.unique(tokens_M[p_pos]):
      pos = p_pos & (tokens_M == tok)
      if pos.sum() >= min_positives:
        children.append(f"token={vocab[int(tok)]}")
        child_cols.append((children[-1], pos, d, "token"))
    if len(children) >= 2:
      cols += [(parent, p_pos, d, class_label)] + child_cols
      families[parent] = children
  return cols, families


def grammar_hierarchy(grammar: grammars.Grammar, lm: recovery.LabelMatrix, tokens_M: Any = None,
                      *, min_positives: int = 10, depth_label: str = "depth_after"
                      ) -> Hierarchy:
  """The natural feature hierarchy of a grammar's labels (module docstring).

  Args:
    grammar: the grammar the labels came from (its `kind` picks the hierarchy, its `vocab`
      names the token children).
    lm: `recovery.label_matrix(grammars.labels(grammar, tokens_BT), ..., mask_BT)`.
    tokens_M: int `[M]` token ids of the same M tokens (`tokens_BT[mask_BT]`); required for
      Expr and PCFG grammars (children are tokens), unused for Dyck.
    min_positives: a child needs at least this many positive tokens.
    depth_label: Dyck only: the ordinal depth column (`depth_after` or `depth_before`).

  Returns:
    A `Hierarchy` (possibly with no families if every child is too rare).

  Raises:
    ValueError: missing label columns, missing or misaligned `tokens_M`, or min_positives < 1.
  """
  if not isinstance(min_positives, int) or min_positives < 1:
    raise ValueError(f"min_positives={min_positives!r} must be a positive int.")
  if grammar.kind == "dyck":
    cols, families = _depth_families(lm, depth_label, min_positives)
  else:
    if tokens_M is None:
      raise ValueError(f"grammar {grammar.name} ({grammar.kind}) has token-level children; "
                       "pass tokens_M = tokens_BT[mask_BT] for the LabelMatrix's tokens.")
    tokens_M = np.asarray(tokens_M)
    if tokens_M.shape != (lm.num_tokens,) or not np.issubdtype(tokens_M.dtype, np.integer):
      raise ValueError(f"tokens_M must be an int [{lm.num_tokens}] array (one id per "
                       f"LabelMatrix token), got {tokens_M.dtype} {tokens_M.shape}.")
    class_label = _CLASS_LABEL.get(grammar.kind, _PCFG_CLASS_LABEL)
    cols, families = _token_families(grammar, lm, tokens_M, class_label, min_positives)
  families = {p: c for p, c in families.items() if len(c) >= 2}
  keep = set(families) | {c for cs in families.values() for c in cs}
  cols = [c for c in cols if c[0] in keep]
  if not cols:
    empty = recovery.LabelMatrix(names=(), values=np.zeros((lm.num_tokens, 0), np.float32),
                                 defined=np.zeros((lm.num_tokens, 0), bool), kinds=(),
                                 sources=())
    return Hierarchy(columns=empty, families=())
  return make_hierarchy(_binary_matrix(cols), families)


# ------------------------------------------------------------------------------------------------
# Hierarchies: absorption, hedging.


@dataclasses.dataclass(frozen=True)
class FamilyLatents:
  """The latents of one family (`family_latents`); −1 where no latent fires on the feature.

  Attributes:
    parent: the family's parent column name.
    parent_latent: argmax over latents of firing F1 on the parent.
    children: the child column names.
    child_latents: per child, argmax over latents other than `parent_latent` of firing F1 on
      the child.
  """

  parent: str
  parent_latent: int
  children: tuple[str, ...]
  child_latents: tuple[int, ...]


def family_latents(counts: firing.FiringCounts, h: Hierarchy) -> list[FamilyLatents]:
  """The parent's and each child's best latent by firing F1 (ties: the lowest index).

  Args:
    counts: `firing.firing_counts(codes, h.columns)`.
    h: the hierarchy.
  """
  f1 = counts.f1_FK
  out = []
  for fam in h.families:
    p = h.columns.names.index(fam.parent)
    a_p = int(np.argmax(f1[:, p])) if f1[:, p].max() > 0 else -1
    kids = []
    for child in fam.children:
      s = f1[:, h.columns.names.index(child)].copy()
      if a_p >= 0:
        s[a_p] = -1.0
      kids.append(int(np.argmax(s)) if s.max() > 0 else -1)
    out.append(FamilyLatents(fam.parent, a_p, fam.children, tuple(kids)))
  return out


def _positives(lm: recovery.LabelMatrix, name: str) -> np.ndarray:
  j = lm.names.index(name)
  return lm.defined[:, j] & (lm.values[:, j] == 1)


def absorption(codes_MF: Any, h: Hierarchy,
               latents: Sequence[FamilyLatents] | None = None) -> list[dict[str, Any]]:
  """Exact feature absorption per family.

  With a_P the parent's latent and a_c each child's (`family_latents`), a parent token t is
  *absorbed* when a_P is silent at t (code ≤ 0) and, for some child c positive at t, a_c fires
  at t (a_c ≠ a_P by construction). Then

      absorption(P)    = #absorbed parent tokens / #parent tokens,
      absorption(P, c) = #{t ∈ c : a_P silent, a_c fires} / #c tokens,

  and `parent_silent` = #{t ∈ P : a_P silent} / #P (= 1 − the parent latent's recall), of which
  `absorbed / silent` is the part a child latent explains. SAEBench estimates absorption on
  natural text from a linear probe standing in for the parent and thresholds on latent–probe
  cosines; here the parent and children are exact labels and the numbers are counts. A family
  whose parent has no firing latent (a_P = −1) has no absorption (fields None).

  Args:
    codes_MF: `[M, F]` on the tokens of `h.columns`.
    h: the hierarchy.
    latents: `family_latents(firing.firing_counts(codes_MF, h.columns), h)` if already computed.

  Returns:
    One dict per family: `parent`, `parent_latent`, `parent_tokens`, `silent`, `absorbed`
    (token counts), `absorption`, `parent_silent` (fractions), and `children`: child name →
    `{"latent", "tokens", "absorbed", "absorption"}`.
  """
  codes = firing.check_codes(codes_MF, h.columns.num_tokens)
  if latents is None:
    latents = family_latents(firing.firing_counts(codes, h.columns), h)
  out = []
  for fl in latents:
    p_pos = _positives(h.columns, fl.parent)
    n_p = int(p_pos.sum())
    silent = p_pos & (codes[:, fl.parent_latent] <= 0) if fl.parent_latent >= 0 else None
    absorbed_any = np.zeros_like(p_pos)
    children = {}
    for child, a_c in zip(fl.children, fl.child_latents):
      c_pos = _positives(h.columns, child)
      n_c = int(c_pos.sum())
      if silent is None:
        children[child] = {"latent": a_c, "tokens": n_c, "absorbed": None, "absorption": None}
        continue
      hit = c_pos & silent & (codes[:, a_c] > 0) if a_c >= 0 else np.zeros_like(c_pos)
      absorbed_any |= hit
      children[child] = {"latent": a_c, "tokens": n_c, "absorbed": int(hit.sum()),
                         "absorption": float(hit.sum() / n_c) if n_c else None}
    entry = {"parent": fl.parent, "parent_latent": fl.parent_latent, "parent_tokens": n_p,
             "silent": None, "absorbed": None, "absorption": None, "parent_silent": None,
             "children": children}
    if silent is not None and n_p:
      entry.update(silent=int(silent.sum()), absorbed=int(absorbed_any.sum()),
                   absorption=float(absorbed_any.sum() / n_p),
                   parent_silent=float(silent.sum() / n_p))
    out.append(entry)
  return out


def hedging(codes_MF: Any, h: Hierarchy,
            latents: Sequence[FamilyLatents] | None = None) -> list[dict[str, Any]]:
  """Where a child latent's firing mass lies: on the child, on the rest of the parent, outside.

  For each child c with latent a_c (`family_latents`) and mass m_t = max(code_{a_c}(t), 0) over
  the tokens where the parent is defined:

      hedging(c) = Σ_{t ∈ P \\ c} m_t / Σ_t m_t,

  next to `on_child` = Σ_{t ∈ c} m_t / Σ m_t and `outside` = Σ_{t ∉ P} m_t / Σ m_t (the three
  sum to 1). A child latent that hedges towards its parent puts mass on parent-but-not-child
  tokens; one that is the parent's own latent in disguise has hedging ≈ 1 − |c| / |P|.

  Returns:
    One dict per (family, child): `parent`, `child`, `latent` and the fractions `on_child`,
    `hedging`, `outside` (None when the child has no latent or the latent never fires).
  """
  codes = firing.check_codes(codes_MF, h.columns.num_tokens)
  if latents is None:
    latents = family_latents(firing.firing_counts(codes, h.columns), h)
  out = []
  for fl in latents:
    j = h.columns.names.index(fl.parent)
    universe = h.columns.defined[:, j]
    p_pos = _positives(h.columns, fl.parent)
    for child, a_c in zip(fl.children, fl.child_latents):
      entry = {"parent": fl.parent, "child": child, "latent": a_c, "on_child": None,
               "hedging": None, "outside": None}
      if a_c >= 0:
        m = np.where(universe, np.maximum(codes[:, a_c], 0.0), 0.0).astype(np.float64)
        total = m.sum()
        if total > 0:
          c_pos = _positives(h.columns, child)
          entry.update(on_child=float(m[c_pos].sum() / total),
                       hedging=float(m[p_pos & ~c_pos].sum() / total),
                       outside=float(m[~p_pos].sum() / total))
      out.append(entry)
  return out

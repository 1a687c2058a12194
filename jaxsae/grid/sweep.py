"""Sweeps: a grid declaration → variants → compilation groups with stacked hyperparameters.

A sweep is a list of *blocks*; each block expands to variants and the sweep is their union::

    [
        {"product": {"expansion": [1, 2, 4, 8], "sparsity_coeff": [1e-3, 1e-2]},
         "set": {"activation": "relu"}},
        {"product": {"expansion": [1, 2, 4, 8], "k": [8, 16, 32]},
         "zip": {"seed": [0, 1], "lr": [1e-4, 3e-4]},
         "set": {"activation": "topk"}},
    ]

`product` axes combine as a Cartesian product, `zip` axes (equal lengths) advance together, and
`set` fixes fields for the block; everything else takes the registry default. Every field is
declared in a registry of `Field`s that says whether it is *static* (changes shapes or control
flow: architecture, width, loss family — it defines a compilation group) or *dynamic* (a number
stacked on the group's leading variant axis, so one group compiles once however many variants
it holds). Groups are formed by equal static values; `derive` hooks may compute static values
from a whole group (e.g. TopK's `k_max` = the largest k in the group, k itself stays dynamic).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jaxsae.core import jsonio


class SweepError(ValueError):
  """A sweep declaration is invalid; the message names the block/field and the fix."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One sweepable field.

  Attributes:
    name: field name as written in the sweep.
    default: value when neither `set` nor an axis gives one.
    static: True if the field defines the compilation group.
    dtype: numpy dtype of the stacked array for dynamic fields.
    check: optional validator `value -> error message or None`.
    doc: one line (with units) for the configuration reference.
  """

  name: str
  default: Any
  static: bool
  dtype: Any = np.float32
  check: Callable[[Any], str | None] | None = None
  doc: str = ""


@dataclasses.dataclass(frozen=True)
class Variant:
  """One point of the sweep: every field's value, an id and a readable label."""

  index: int
  id: str
  values: Mapping[str, Any]
  label: str


@dataclasses.dataclass(frozen=True)
class Group:
  """Variants that share static structure, with their dynamic fields stacked.

  Attributes:
    name: e.g. "g0".
    static: the static field values (after `derive` hooks).
    variants: the member variants, in sweep order.
    dynamic: field → np.ndarray [N] (N = len(variants)).
  """

  name: str
  static: Mapping[str, Any]
  variants: tuple[Variant, ...]
  dynamic: Mapping[str, np.ndarray]

  @property
  def size(self) -> int:
    return len(self.variants)

  @property
  def ids(self) -> tuple[str, ...]:
    return tuple(v.id for v in self.variants)


def _as_list(block_index: int, kind: str, name: str, values) -> list:
  if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
    raise SweepError(f"sweep block {block_index}: {kind} axis '{name}' must be a list of values, "
                     f"got {values!r}; write e.g. {name}=[{values!r}]")
  values = list(values)
  if not values:
    raise SweepError(f"sweep block {block_index}: {kind} axis '{name}' is empty; give it at "
                     "least one value or remove it")
  return values


def expand(blocks: Sequence[Mapping[str, Any]], registry: Sequence[Field]) -> list[Variant]:
  """Expands sweep blocks into variants (validated against the registry)."""
  fields = {f.name: f for f in registry}
  if isinstance(blocks, Mapping):
    blocks = [blocks]
  if not blocks:
    raise SweepError("the sweep is empty: declare at least one block, e.g. "
                     "[{'product': {'sparsity_coeff': [1e-3]}}]")
  variants: list[Variant] = []
  seen: dict[tuple, int] = {}
  for bi, block in enumerate(blocks):
    block = dict(block)
    unknown_keys = set(block) - {"product", "zip", "set"}
    if unknown_keys:
      raise SweepError(f"sweep block {bi} has keys {sorted(unknown_keys)}; a block may only have "
                       "'product', 'zip' and 'set'")
    product = {k: _as_list(bi, "product", k, v) for k, v in dict(block.get("product", {})).items()}
    zipped = {k: _as_list(bi, "zip", k, v) for k, v in dict(block.get("zip", {})).items()}
    fixed = dict(block.get("set", {}))
    named = list(product) + list(zipped) + list(fixed)
    for name in named:
      if name not in fields:
        raise SweepError(f"sweep block {bi}: unknown field '{name}'; known fields: "
                         f"{', '.join(sorted(fields))}")
    dup = {n for n in named if named.count(n) > 1}
    if dup:
      raise SweepError(f"sweep block {bi}: field(s) {sorted(dup)} given more than once "
                       "(in product, zip or set); give each field once")
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
      raise SweepError(f"sweep block {bi}: zip axes have different lengths {lengths}; zip axes "
                       "advance together and must be equally long")
    n_zip = next(iter(lengths.values())) if lengths else 1
    for combo in itertools.product(*product.values()):
      for z in range(n_zip):
        values = {f.name: f.default for f in registry}
        values.update(fixed)
        values.update(dict(zip(product, combo)))
        values.update({k: v[z] for k, v in zipped.items()})
        for name, value in values.items():
          err = fields[name].check(value) if fields[name].check else None
          if err:
            raise SweepError(f"sweep block {bi}: {name}={value!r}: {err}")
        key = tuple(_freeze(values[f.name]) for f in registry)
        if key in seen:
          raise SweepError(f"sweep block {bi} repeats variant {seen[key]} "
                           f"({_label(values, named)}); remove the duplicate")
        index = len(variants)
        seen[key] = index
        label = _label(values, named)
        variants.append(Variant(index=index, id=f"v{index:03d}", values=values, label=label))
  return variants


def _freeze(value):
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


def _label(values: Mapping[str, Any], names: Iterable[str]) -> str:
  return " ".join(f"{n}={values[n]}" for n in dict.fromkeys(names))


def group(variants: Sequence[Variant], registry: Sequence[Field],
          derive: Callable[[dict, list[Variant]], dict] | None = None) -> list[Group]:
  """Groups variants by their static fields and stacks the dynamic ones.

  Args:
    variants: from `expand`.
    registry: the field declarations.
    derive: optional hook `(static_values, members) -> updated static values`, run per group
      (e.g. to set k_max from the members' k). It may not merge or split groups.

  Returns:
    Groups in order of their first variant.
  """
  static_names = [f.name for f in registry if f.static]
  dynamic = [f for f in registry if not f.static]
  buckets: dict[tuple, list[Variant]] = {}
  for v in variants:
    buckets.setdefault(tuple(_freeze(v.values[n]) for n in static_names), []).append(v)
  groups = []
  for gi, members in enumerate(buckets.values()):
    static = {n: members[0].values[n] for n in static_names}
    if derive is not None:
      static = derive(dict(static), list(members))
    stacked = {f.name: np.asarray([m.values[f.name] for m in members], dtype=f.dtype)
               for f in dynamic}
    groups.append(Group(name=f"g{gi}", static=static, variants=tuple(members), dynamic=stacked))
  return groups


def describe(groups: Sequence[Group]) -> list[dict[str, Any]]:
  """JSON-ready list of every variant: id, label, group and all hyperparameters."""
  out = []
  for g in groups:
    for i, v in enumerate(g.variants):
      values = {k: to_json(x) for k, x in v.values.items()}
      values.update({k: to_json(x) for k, x in g.static.items()})
      out.append({"id": v.id, "index": v.index, "label": v.label, "group": g.name,
                  "position_in_group": i, "hparams": values})
  return sorted(out, key=lambda d: d["index"])


def to_json(x):
  """A value as JSON can hold it (numpy scalars unwrapped, sequences as lists)."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (list, tuple)):
    return [to_json(v) for v in x]
  return x


def write_variants_json(path: str, groups: Sequence[Group]) -> None:
  """Writes `variants.json` (see `describe`)."""
  jsonio.write(path, {"groups": [{"name": g.name, "size": g.size,
                                  "static": {k: to_json(v) for k, v in g.static.items()}}
                                 for g in groups],
                      "variants": describe(groups)})

"""Dictionary geometry: how the decoder directions of SAEs relate to each other.

A dictionary is `[F, D]`, one direction per row (`sae.dictionary(params, config)`). The score is
the max cosine similarity of each direction with another one: within one SAE (against its other
F − 1 directions: duplicated or split features) or across two (e.g. an e2e against a local SAE
at the same site), summarised as a `Similarity`; `cross_seed_consistency` averages the
cross-SAE score over the ordered pairs of several SAEs (e.g. one architecture, different seeds).
Zero directions have cosine 0 with everything.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("exclude_self",))
def _max_cos(a_FD: jax.Array, b_GD: jax.Array, exclude_self: bool) -> jax.Array:
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  cos_FG = jnp.einsum("fd,gd->fg", unit(a_FD), unit(b_GD), precision=_HIGHEST)
  if exclude_self:
    cos_FG = jnp.where(jnp.eye(cos_FG.shape[0], dtype=bool), -jnp.inf, cos_FG)
  return jnp.max(cos_FG, axis=1)


@dataclasses.dataclass(frozen=True)
class Similarity:
  """Max cosine similarity of each direction of a dictionary (see `dictionary_similarity`).

  Attributes:
    max_cos: float `[F]`.
    mean, median: of `max_cos`.
    frac_above: fraction of `max_cos` > `threshold`.
    threshold: the cut-off used for `frac_above`.
  """

  max_cos: np.ndarray
  mean: float
  median: float
  frac_above: float
  threshold: float

  def summary(self) -> dict[str, float]:
    """JSON-able stats: `mean`, `median`, `frac_above_<threshold>`."""
    return {"mean": self.mean, "median": self.median,
            f"frac_above_{self.threshold:g}": self.frac_above}


def _check_dict(d: Any, what: str) -> jax.Array:
  d = jnp.asarray(d, jnp.float32)
  if d.ndim != 2:
    raise ValueError(f"{what} must be [F, D] (rows = directions, as sae.dictionary returns), "
                     f"got shape {d.shape}.")
  return d


def dictionary_similarity(dict_FD: Any, other_GD: Any = None,
                          threshold: float = 0.9) -> Similarity:
  """Max cosine similarity of each direction with another direction.

  Args:
    dict_FD: `[F, D]` dictionary (rows = directions, `sae.dictionary(params, config)`).
    other_GD: optional `[G, D]` dictionary. Without it: within-SAE similarity, each direction
      against the other F − 1 of the same dictionary. With it: cross-SAE, against every row of
      `other_GD` (e.g. an e2e vs a local SAE).
    threshold: cut-off for `frac_above`.

  Returns:
    A `Similarity` (zero rows have cosine 0 with everything).
  """
  a = _check_dict(dict_FD, "dict_FD")
  if other_GD is None:
    if a.shape[0] < 2:
      raise ValueError("within-SAE similarity needs at least 2 directions; pass other_GD for a "
                       "cross-SAE comparison.")
    m = _max_cos(a, a, True)
  else:
    b = _check_dict(other_GD, "other_GD")
    if b.shape[1] != a.shape[1]:
      raise ValueError(f"dictionaries live in different spaces: D={a.shape[1]} vs "
                       f"{b.shape[1]}; compare SAEs trained at the same site.")
    m = _max_cos(a, b, False)
  m = np.asarray(m, np.float64)
  return Similarity(max_cos=m, mean=float(m.mean()), median=float(np.median(m)),
                    frac_above=float(np.mean(m > threshold)), threshold=float(threshold))


def cross_seed_consistency(dicts: Sequence[Any]) -> float:
  """Mean over ordered pairs (i ≠ j) of the mean max cosine of dictionary i's directions with
  dictionary j's: 1 when every seed finds the same directions.

  Args:
    dicts: two or more `[F_i, D]` dictionaries (e.g. one architecture, different seeds).
  """
  ds = [_check_dict(d, f"dicts[{i}]") for i, d in enumerate(dicts)]
  if len(ds) < 2:
    raise ValueError(f"cross_seed_consistency needs at least 2 dictionaries, got {len(ds)}.")
  return float(np.mean([dictionary_similarity(a, b).mean
                        for a, b in itertools.permutations(ds, 2)]))

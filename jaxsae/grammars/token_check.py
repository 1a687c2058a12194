"""Validation of token arrays at the grammar package's public entry points.

The recognisers, the CKY parser and the label functions take full sequences `tokens_BT`. Bad
arrays are refused here, on the host, before anything is compiled, with an error naming the
problem and the fix: never a silent cast (floats truncated, int64 ids wrapped modulo 2^32) or
a verdict on ids outside the vocabulary (a negative id is not a terminal).

Concrete arrays (NumPy, Python lists, committed `jax.Array`s) get every check. Traced arrays
(inside `jax.jit`) have no values yet: their dtype and rank are checked, and the compiled
recognisers themselves treat out-of-range ids as non-terminals (an ungrammatical verdict), so
the jitted paths cost nothing extra.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.grammars import pcfg


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def check(grammar: pcfg.Grammar, tokens_BT: Any, *, where: str, min_len: int | None = None):
  """Checks `tokens_BT` for `grammar` and returns it as int32 (NumPy in, NumPy out).

  Args:
    grammar: the grammar whose vocabulary the ids index.
    tokens_BT: integer token ids of shape [B, T].
    where: the public function being called (named in the errors).
    min_len: the shortest T accepted; default: decorator + one sentence token + `<eos>`.

  Returns:
    The ids as an int32 array: a `jax.Array` for `jax.Array` input (traced or not), else a
    NumPy array.

  Raises:
    TypeError: `grammar` is not a Grammar, or the ids are not integers (floats, bools, objects).
    ValueError: a rank other than 2, sequences shorter than `min_len`, or an id outside
      [0, vocab_size).
  """
  if not isinstance(grammar, pcfg.Grammar):
    raise TypeError(f"{where}: expected a jaxsae.grammars Grammar, got "
                    f"{type(grammar).__name__}; build one with grammars.get(name) or "
                    "grammars.from_string(text)")
  is_jax = isinstance(tokens_BT, jax.Array)
  arr = tokens_BT if is_jax else np.asarray(tokens_BT)
  dtype = np.dtype(arr.dtype)
  if dtype.kind not in "iu":
    raise TypeError(
        f"{where}: token ids must be integers, got dtype {dtype}; ids are never cast "
        "silently (a float would be truncated, a bool read as 0/1). Pass integer ids, e.g. "
        "from grammars.sample or grammar.token_id, or convert exact whole numbers with "
        ".astype(np.int32)")
  if arr.ndim != 2:
    fix = (" (one sequence: add a batch axis, tokens[None])" if arr.ndim == 1 else
           "; reshape to [batch, positions]")
    raise ValueError(f"{where}: expected token ids of shape [B, T] (rank 2), got shape "
                     f"{tuple(arr.shape)}{fix}")
  n_min = grammar.prefix_len + 2 if min_len is None else min_len
  t = arr.shape[1]
  if t < n_min:
    raise ValueError(
        f"{where}: sequences of length T={t} are too short: a full sequence holds the "
        f"{grammar.prefix_len}-token decorator, a sentence of at least one token and <eos>, so "
        f"T >= {n_min}; pass longer (padded) sequences")
  if _is_traced(arr):
    return jnp.asarray(arr, jnp.int32)
  host = np.asarray(arr)
  v = grammar.vocab_size
  if host.size:
    bad = (host < 0) | (host >= v)
    if bad.any():
      b, p = (int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"{where}: token ids must lie in [0, {v}) (the vocabulary of grammar "
          f"{grammar.name!r}); found {int(bad.sum())} outside it, values {int(host.min())} to "
          f"{int(host.max())}, the first {int(host[b, p])} at row {b}, position {p}. Use ids "
          "from grammar.token_id / grammars.sample (pad with grammar.pad_id)")
  if is_jax:
    return jnp.asarray(arr, jnp.int32)
  return host.astype(np.int32, copy=False)

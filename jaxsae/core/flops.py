"""Performance accounting for the benchmarks: the measured matrix-multiply peak of a device."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_peak(sizes=(256, 512, 1024, 2048), repeats: int = 5) -> tuple[float, int]:
  """Best float32 GFLOP/s of a jitted square `a @ b` over `sizes`, and the size that gave it."""
  f = jax.jit(lambda a, b: a @ b)
  best, best_n = 0.0, 0
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f(a, b).block_until_ready()
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      gflops = 2 * n ** 3 / (time.perf_counter() - t0) / 1e9
      if gflops > best:
        best, best_n = gflops, n
  return best, best_n

"""Shared pytest configuration: strict numerics and CPU-only, deterministic JAX.

The tests are dominated by compilation of small programs, so XLA's backend (LLVM) optimisation
is turned down (about 30% less wall time for the training tests); results are still compared
run against run under the same flags, and against independent references with tolerances.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")

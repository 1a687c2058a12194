"""Shared pytest configuration: strict numerics and CPU-only, deterministic JAX."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")

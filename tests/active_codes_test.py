"""Tests for jaxsae.grid.active_codes: the sparse products and their VJPs equal the dense ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.grid import active_codes
from jaxsae.grid import metrics as metrics_lib

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


def _random_active(seed, n, f, j, aligned):
  """Random distinct (token, latent) entries: J per token (aligned) or J·n anywhere."""
  rng = np.random.default_rng(seed)
  if aligned:
    lat = np.stack([rng.permutation(f)[:j] for _ in range(n)], axis=1)  # [J, n]
    tok = None
  else:
    flat = rng.permutation(n * f)[: j * n]
    lat, tok = (flat % f).reshape(j, n), (flat // f).reshape(j, n)
  vals = rng.normal(size=(j, n)).astype(np.float32)
  vals[0, : n // 3] = 0.0  # zero entries take part like any other
  return active_codes.ActiveCodes(
      vals=jnp.asarray(vals), lat=jnp.asarray(lat, jnp.int32),
      tok=None if tok is None else jnp.asarray(tok, jnp.int32), n=n, width=f)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("n, f, j", [(7, 12, 3), (5, 6, 6), (4, 9, 1)])
def test_decode_and_its_vjp_equal_the_dense_product(aligned, n, f, j):
  active = _random_active(n * f + j, n, f, j, aligned)
  rng = np.random.default_rng(0)
  dict_FD = jnp.asarray(rng.normal(size=(f, 5)).astype(np.float32))
  g_ND = jnp.asarray(rng.normal(size=(n, 5)).astype(np.float32))
  dense = active_codes.to_dense(active)
  # Each (token, latent) entry lands once: the dense matrix holds exactly the J·n values.
  assert int((np.asarray(dense) != 0).sum()) == int((np.asarray(active.vals) != 0).sum())

  def sparse(vals, d):
    return active_codes.decode(active.replace(vals=vals), d)

  out, vjp = jax.vjp(sparse, active.vals, dict_FD)
  ref, ref_vjp = jax.vjp(lambda vals, d: active_codes.to_dense(active.replace(vals=vals)) @ d,
                         active.vals, dict_FD)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for a, b in zip(vjp(g_ND), ref_vjp(g_ND)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aligned", [True, False])
def test_gather_pre_value_and_gradients_equal_the_dense_encoder(aligned):
  n, d, f, j = 6, 4, 10, 3
  active = _random_active(1, n, f, j, aligned)
  rng = np.random.default_rng(2)
  x, w, b = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((n, d), (d, f), (f,)))
  tok = (jnp.broadcast_to(jnp.arange(n)[None], active.lat.shape) if active.tok is None
         else active.tok)
  cot = jnp.asarray(rng.normal(size=(j, n)).astype(np.float32))

  def sparse(x, w, b):
    pre = jax.lax.stop_gradient(x @ w + b[None])
    return active_codes.gather_pre(pre, x, w, b, active.lat, active.tok)

  def dense(x, w, b):
    return (x @ w + b[None])[tok, active.lat]

  out, vjp = jax.vjp(sparse, x, w, b)
  ref, ref_vjp = jax.vjp(dense, x, w, b)
  np.testing.assert_array_equal(out, ref)
  for a, r in zip(vjp(cot), ref_vjp(cot)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_fire_counts_equal_the_dense_counts_and_vmap():
  active = _random_active(3, 8, 11, 4, aligned=False)
  w = jnp.asarray(np.random.default_rng(4).integers(0, 2, 8).astype(np.float32))
  np.testing.assert_array_equal(active_codes.fire_counts(active, w),
                                metrics_lib.latent_fire_counts(active_codes.to_dense(active), w))
  # Over a leading variant axis (the grid's vmap) the products act per variant.
  vals_N = jnp.stack([active.vals, 2 * active.vals])
  dict_FD = jnp.asarray(np.random.default_rng(5).normal(size=(11, 3)).astype(np.float32))
  out_N = _jit(jax.vmap(lambda v: active_codes.decode(active.replace(vals=v), dict_FD)))(vals_N)
  np.testing.assert_allclose(out_N[1], 2 * out_N[0], rtol=1e-6)
  np.testing.assert_allclose(out_N[0], active_codes.to_dense(active) @ dict_FD, rtol=1e-5,
                             atol=1e-6)

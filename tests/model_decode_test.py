"""Tests for the incremental (KV-cache) path of jaxsae.lm (decode.py): it must equal the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.lm import decode as decode_lib
from jaxsae.lm import model as model_lib

TINY = model_lib.ModelConfig(vocab_size=11, n_layers=2, n_heads=2, d_model=32, d_mlp=64,
                             context=16)
B, T = 3, 12
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def tiny():
  params = model_lib.init(jax.random.key(0), TINY)
  # Non-trivial LayerNorm scales and larger weights, so attention is far from uniform.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * (1.0 + 0.3 * jax.random.normal(jax.random.key(len(str(path))), p.shape))
      if "scale" in str(path) else p * 8.0, params)
  tokens_BT = jax.random.randint(jax.random.key(1), (B, T), 0, TINY.vocab_size)
  return params, tokens_BT


# Per-token replacements at several sites (they act on each position's activation alone).
_REPLACE = {
    "resid_post.0": lambda x: 0.7 * x + 0.3 * jnp.tanh(x),
    "attn_out.1": lambda x: x * jnp.linspace(0.0, 2.0, x.shape[-1])[None, None],
    "ln_final": lambda x: x + 0.5,
}


_SITES = ("resid_post.0", "attn_out.1", "mlp_out.1", "ln_final")


@functools.partial(jax.jit, static_argnames=("prefill", "with_replace"))
def _incremental(params, tokens_BT, prefill, with_replace):
  """Logits and activations [B, T, ...] from a `prefill`-token chunk, then a scan of 1-token steps."""
  replace = _REPLACE if with_replace else None
  cache = decode_lib.init_cache(TINY, B, T)
  first, cache = decode_lib.decode_step(params, cache, tokens_BT[:, :prefill], TINY,
                                        replace=replace, collect=_SITES)

  def step(cache, tok_B):
    r, cache = decode_lib.decode_step(params, cache, tok_B[:, None], TINY, replace=replace,
                                      collect=_SITES)
    return cache, (r.logits[:, 0], {k: v[:, 0] for k, v in r.acts.items()})

  cache, (logits_TBV, acts_TBD) = jax.lax.scan(step, cache, tokens_BT[:, prefill:].T)
  logits_BTV = jnp.concatenate([first.logits, jnp.swapaxes(logits_TBV, 0, 1)], axis=1)
  acts = {k: jnp.concatenate([first.acts[k], jnp.swapaxes(v, 0, 1)], axis=1)
          for k, v in acts_TBD.items()}
  return logits_BTV, acts, cache.index


@pytest.mark.parametrize("prefill", [1, 5])
@pytest.mark.parametrize("with_replace", [False, True])
def test_decode_equals_full_forward(tiny, prefill, with_replace):
  params, tokens_BT = tiny
  replace = _REPLACE if with_replace else None
  full = model_lib.apply(params, tokens_BT, TINY, replace=replace, collect=_SITES)
  logits_BTV, acts, index = _incremental(params, tokens_BT, prefill, with_replace)
  assert int(index) == T
  np.testing.assert_allclose(logits_BTV, full.logits, **TOL)
  for s in _SITES:
    np.testing.assert_allclose(acts[s], full.acts[s], **TOL, err_msg=s)


def test_replacement_changes_decode(tiny):
  # Guards the test above: the replacements matter, so a decode path ignoring them would fail.
  params, tokens_BT = tiny
  clean = _incremental(params, tokens_BT, 1, False)[0]
  spliced = _incremental(params, tokens_BT, 1, True)[0]
  assert np.abs(np.asarray(clean - spliced)).max() > 1e-2


def test_attention_uses_the_cache(tiny):
  # Changing an earlier token changes later decode logits (the cache is read), not earlier ones.
  params, tokens_BT = tiny
  other = tokens_BT.at[:, 2].set((tokens_BT[:, 2] + 1) % TINY.vocab_size)
  a = _incremental(params, tokens_BT, 1, False)[0]
  b = _incremental(params, other, 1, False)[0]
  np.testing.assert_array_equal(a[:, :2], b[:, :2])
  assert np.abs(np.asarray(a[:, 3:] - b[:, 3:])).max() > 1e-3


def test_cache_errors(tiny):
  params, tokens_BT = tiny
  with pytest.raises(ValueError, match="context"):
    decode_lib.init_cache(TINY, B, TINY.context + 1)
  cache = decode_lib.init_cache(TINY, B, 4)
  with pytest.raises(ValueError, match="overflow"):
    decode_lib.decode_step(params, cache, tokens_BT[:, :5], TINY)
  with pytest.raises(ValueError, match="batch"):
    decode_lib.decode_step(params, cache, tokens_BT[:1, :2], TINY)
  with pytest.raises(ValueError, match="Unknown replace site"):
    decode_lib.decode_step(params, cache, tokens_BT[:, :2], TINY, replace={"nope": lambda x: x})

"""Sampling from the LM with a KV cache, and the fraction of grammatical generations.

`generate` starts every sequence from the 7-token decorator, prefills it in one chunk, then
runs one `lax.scan` step per new token through `model.decode_step` (so the cost is linear in
the length), picking each token by ancestral sampling at a temperature, top-k sampling, or
greedily. The first `<eos>` ends a sequence: every later position is `<pad>`. An optional
`replace` dict (site -> fn, as in `model.apply`) is active for every position, prompt included,
which is how grammaticality is measured with an SAE spliced in.

`grammaticality` samples `num_batches x batch_size` generations and returns the fraction the
exact recogniser (`grammars.is_grammatical`) accepts, mean ± std over batches. A generation
that emits no `<eos>` within the budget is ungrammatical (it has no end).

Compilation: called outside a trace, `generate` is jitted with the model config, sizes,
sampling method and the `replace` functions as static arguments, so repeated calls with the
same functions reuse one compilation; new closures (e.g. a new SAE's params baked in) compile
again. To sweep many SAEs without recompiling, call `generate` inside your own `jax.jit` with
the SAE params as arguments and build the replacement closures there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import grammars
from jaxsae import model as model_lib

MAX_NEW_TOKENS = 118  # the spec's budget: 7 + 118 = 125 positions (<= 127 input positions)


@flax.struct.dataclass
class Generation:
  """Sampled sequences.

  Attributes:
    tokens: int32 `[B, 7 + max_new_tokens]`: decorator, generated tokens, `<pad>` after the
      first `<eos>`.
    finished: bool `[B]`, an `<eos>` was generated within the budget.
    lengths: int32 `[B]`, sentence length (generated tokens before the first `<eos>`; all
      `max_new_tokens` if none).
  """

  tokens: jax.Array
  finished: jax.Array
  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
  model_config: model_lib.ModelConfig
  decorator: tuple[int, ...]
  eos_id: int
  pad_id: int
  batch_size: int
  max_new_tokens: int
  greedy: bool
  top_k: int
  replace: tuple[tuple[str, Any], ...]


def _pick(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, st: _Static) -> jax.Array:
  """The next token per row: argmax, or a sample from softmax(logits / T) (top-k filtered)."""
  if st.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  if st.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, st.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


def _generate(params, key, temperature, st: _Static) -> Generation:
  cfg = st.model_config
  replace = dict(st.replace) or None
  n_dec = len(st.decorator)
  b = st.batch_size
  cache = model_lib.init_cache(cfg, b, n_dec + st.max_new_tokens)
  dec_BT = jnp.broadcast_to(jnp.asarray(st.decorator, jnp.int32)[None], (b, n_dec))
  res, cache = model_lib.decode_step(params, cache, dec_BT, cfg, replace=replace)

  def step(carry, i):
    cache, logits_BV, done_B = carry
    tok_B = _pick(logits_BV, jax.random.fold_in(key, i), temperature, st)
    tok_B = jnp.where(done_B, st.pad_id, tok_B)
    done_B = done_B | (tok_B == st.eos_id)
    # The last step's forward is unused; one wasted position keeps the loop uniform.
    res, cache = model_lib.decode_step(params, cache, tok_B[:, None], cfg, replace=replace)
    return (cache, res.logits[:, 0], done_B), tok_B

  init = (cache, res.logits[:, -1], jnp.zeros((b,), bool))
  (_, _, done_B), new_TB = jax.lax.scan(step, init, jnp.arange(st.max_new_tokens))
  new_BT = new_TB.T
  is_eos_BT = new_BT == st.eos_id
  lengths = jnp.where(done_B, jnp.argmax(is_eos_BT, axis=1), st.max_new_tokens).astype(jnp.int32)
  return Generation(tokens=jnp.concatenate([dec_BT, new_BT], axis=1), finished=done_B,
                    lengths=lengths)


_generate_jit = jax.jit(_generate, static_argnames=("st",))


def _static(model_config, grammar, batch_size, max_new_tokens, greedy, top_k, replace) -> _Static:
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if model_config.vocab_size != grammar.vocab_size:
    raise ValueError(f"model vocab_size {model_config.vocab_size} != grammar {grammar.name}'s "
                     f"vocabulary size {grammar.vocab_size}")
  n_dec = grammar.prefix_len
  if n_dec + int(max_new_tokens) > model_config.context:
    raise ValueError(f"7 decorator tokens + max_new_tokens={max_new_tokens} exceed the model "
                     f"context {model_config.context}; lower max_new_tokens.")
  if not 0 <= int(top_k) <= model_config.vocab_size:
    raise ValueError(f"top_k must lie in [0, vocab_size={model_config.vocab_size}] "
                     f"(0 = no top-k filter), got {top_k}")
  if replace is None:
    pairs = ()
  elif isinstance(replace, Mapping):
    pairs = tuple(replace.items())
  else:
    pairs = tuple(tuple(p) for p in replace)
  return _Static(model_config=model_config, decorator=tuple(grammar.decorator_ids),
                 eos_id=grammar.eos_id, pad_id=grammar.pad_id, batch_size=int(batch_size),
                 max_new_tokens=int(max_new_tokens), greedy=bool(greedy), top_k=int(top_k),
                 replace=pairs)


def generate(params: model_lib.Params, model_config: model_lib.ModelConfig,
             grammar: grammars.Grammar, key: jax.Array, *, batch_size: int = 128,
             max_new_tokens: int = MAX_NEW_TOKENS, temperature: float | jax.Array = 1.0,
             top_k: int = 0, greedy: bool = False,
             replace: model_lib.Replace = None) -> Generation:
  """Generates `batch_size` sequences from the decorator (jitted; works inside jit too).

  Args:
    params: LM params.
    model_config: its config (`vocab_size` must be the grammar's).
    grammar: supplies the decorator and the `<eos>` / `<pad>` ids.
    key: typed PRNG key; token i of the generation uses `fold_in(key, i)`.
    batch_size: number of sequences B.
    max_new_tokens: generation budget after the decorator (default 118, the spec's).
    temperature: softmax temperature (> 0) of ancestral / top-k sampling; may be traced.
    top_k: if > 0, sample among the k most likely tokens only.
    greedy: take the argmax (temperature and top_k are ignored).
    replace: site -> per-token function, as in `model.apply`, active during generation.

  Returns:
    A `Generation`.
  """
  chex.assert_shape(key, ())
  st = _static(model_config, grammar, batch_size, max_new_tokens, greedy, top_k, replace)
  if not isinstance(temperature, jax.core.Tracer) and not greedy and not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
  temperature = jnp.asarray(temperature, jnp.float32)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((params, key))):
    return _generate(params, key, temperature, st)
  try:
    hash(st)
  except TypeError:  # unhashable replacement callables: compile this call on its own
    return jax.jit(functools.partial(_generate, st=st))(params, key, temperature)
  return _generate_jit(params, key, temperature, st=st)


_SCAN_KINDS = ("dyck", "expr_prefix", "expr_postfix")
_JITTED: dict[tuple[int, str], tuple[grammars.Grammar, Callable[..., Any]]] = {}


def jitted_for(grammar: grammars.Grammar, fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn(grammar, tokens)` as a function of tokens: jitted for the scan recognisers (Dyck,
  Expr; one compilation instead of many eager ones), plain for CKY grammars (whose concrete
  path buckets rows by sentence length, much faster than one full-size chart under jit)."""
  if grammar.kind not in _SCAN_KINDS:
    return functools.partial(fn, grammar)
  entry = _JITTED.get((id(grammar), fn.__name__))
  if entry is None or entry[0] is not grammar:
    entry = (grammar, jax.jit(functools.partial(fn, grammar)))
    _JITTED[(id(grammar), fn.__name__)] = entry
  return entry[1]


def _recogniser(grammar: grammars.Grammar) -> Callable[..., Any]:
  return jitted_for(grammar, grammars.is_grammatical)


def grammaticality(params: model_lib.Params, model_config: model_lib.ModelConfig,
                   grammar: grammars.Grammar, key: jax.Array, *, num_batches: int = 5,
                   batch_size: int = 128, replace: model_lib.Replace = None,
                   max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 1.0,
                   top_k: int = 0, greedy: bool = False,
                   num_samples: int = 8) -> dict[str, Any]:
  """Fraction of generations the exact recogniser accepts, over `num_batches` batches.

  Batch i uses `fold_in(key, i)`. A generation without `<eos>` within the budget counts as
  ungrammatical.

  Returns:
    dict with `mean` and `std` (population std over batches) of the per-batch fractions,
    `per_batch` (list), `finished` (fraction that emitted `<eos>`), `mean_length` (mean
    sentence length of the finished ones), and `samples`: the first `num_samples` sentences
    of batch 0, decoded, each marked with its verdict.
  """
  fractions, finished, lengths, samples = [], [], [], []
  for i in range(int(num_batches)):
    gen = generate(params, model_config, grammar, jax.random.fold_in(key, i),
                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, greedy=greedy, replace=replace)
    tokens = np.asarray(gen.tokens)
    # One extra <pad> column changes no verdict and lets the recogniser accept tiny budgets.
    # Concrete tokens: the CKY recogniser (English) buckets by sentence length, much faster.
    padded = np.concatenate([tokens, np.full_like(tokens[:, :1], grammar.pad_id)], axis=1)
    ok = np.asarray(_recogniser(grammar)(padded))
    done = np.asarray(gen.finished)
    fractions.append(float(ok.mean()))
    finished.append(done)
    lengths.append(np.asarray(gen.lengths)[done])
    if i == 0:
      texts = grammar.decode(tokens[:num_samples], sentence_only=True)
      samples = [f"{'✓' if g else '✗'} {t}{'' if d else ' …(no <eos>)'}"
                 for t, g, d in zip(texts, ok, done)]
  lengths = np.concatenate(lengths)
  return {
      "mean": float(np.mean(fractions)),
      "std": float(np.std(fractions)),
      "per_batch": fractions,
      "finished": float(np.concatenate(finished).mean()),
      "mean_length": float(lengths.mean()) if lengths.size else float("nan"),
      "samples": samples,
  }

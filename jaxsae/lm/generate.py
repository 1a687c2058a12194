"""Sampling from the LM with a KV cache, and the fraction of grammatical generations.

`generate` starts every sequence from the 7-token decorator, prefills it in one chunk
(`prefill`), then runs one `lax.while_loop` step per new token through `decode.decode_step`
(`decode`; the cost is linear in the length), picking each token by ancestral sampling at a
temperature, top-k sampling, or greedily. The first `<eos>` ends a sequence: every later
position is `<pad>`, and the loop stops as soon as every row of the batch has emitted `<eos>`
(the remaining steps would only append `<pad>`). An optional `replace` dict (site -> fn, as in
`model.apply`) is active for every position, prompt included, which is how grammaticality is
measured with an SAE spliced in.

`generate_batches` draws G batches (one key each) in one call: the prompt is prefilled once
and shared, and the batches run one after another (`lax.map`, each stopping on its own) on CPU
or vmapped elsewhere; batch g equals `generate` with key g token for token.

`grammaticality` samples `num_batches x batch_size` generations and returns the fraction the
exact recogniser (`grammars.is_grammatical`) accepts, mean ± std over batches. A generation
that emits no `<eos>` within the budget is ungrammatical (it has no end).

Compilation: called outside a trace, `generate` is jitted with the model config, sizes,
sampling method and the `replace` functions as static arguments, so repeated calls with the
same functions reuse one compilation; new closures (e.g. a new SAE's params baked in) compile
again. To sweep many SAEs without recompiling, call `prefill` / `decode` (or `generate`) inside
your own `jax.jit` with the SAE params as arguments and build the replacement closures there
(`spliced_generation` does).
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
from jaxsae.core import variant_axis
from jaxsae.lm import decode as decode_lib
from jaxsae.lm import model as model_lib

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


@flax.struct.dataclass
class Prefix:
  """The prefilled decorator: what every generation from it shares.

  Attributes:
    cache: the model's KV cache after the decorator's positions (`decode.init_cache` sized for
      the decorator and the whole generation budget).
    logits_BV: float32 `[B, V]` next-token logits after the last decorator position.
  """

  cache: Any
  logits_BV: jax.Array


def _prefill(params, st: _Static) -> Prefix:
  replace = dict(st.replace) or None
  n_dec = len(st.decorator)
  cache = decode_lib.init_cache(st.model_config, st.batch_size, n_dec + st.max_new_tokens)
  dec_BT = jnp.broadcast_to(jnp.asarray(st.decorator, jnp.int32)[None], (st.batch_size, n_dec))
  res, cache = decode_lib.decode_step(params, cache, dec_BT, st.model_config, replace=replace)
  return Prefix(cache=cache, logits_BV=res.logits[:, -1])


def _decode(params, prefix: Prefix, key, temperature, st: _Static) -> Generation:
  """Samples from a prefilled decorator until every row has emitted <eos> or the budget ends.

  Token i is drawn from `fold_in(key, i)`. The loop stops as soon as every row is done (the
  rest of the budget would only append `<pad>`), and never runs the forward of the last token.
  """
  cfg = st.model_config
  replace = dict(st.replace) or None
  b, n_new = st.batch_size, st.max_new_tokens

  def pick(logits_BV, done_B, i, new_BT):
    tok_B = _pick(logits_BV, jax.random.fold_in(key, i), temperature, st)
    tok_B = jnp.where(done_B, st.pad_id, tok_B)
    new_BT = jax.lax.dynamic_update_slice_in_dim(new_BT, tok_B[:, None], i, axis=1)
    return tok_B, done_B | (tok_B == st.eos_id), new_BT

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < n_new) & ~jnp.all(done_B)

  def body(carry):
    i, cache, tok_B, done_B, new_BT = carry
    res, cache = decode_lib.decode_step(params, cache, tok_B[:, None], cfg, replace=replace)
    tok_B, done_B, new_BT = pick(res.logits[:, 0], done_B, i, new_BT)
    return i + 1, cache, tok_B, done_B, new_BT

  new_BT = jnp.full((b, n_new), st.pad_id, jnp.int32)
  tok_B, done_B, new_BT = pick(prefix.logits_BV, jnp.zeros((b,), bool), 0, new_BT)
  init = (jnp.int32(1), prefix.cache, tok_B, done_B, new_BT)
  _, _, _, done_B, new_BT = jax.lax.while_loop(cond, body, init)
  is_eos_BT = new_BT == st.eos_id
  lengths = jnp.where(done_B, jnp.argmax(is_eos_BT, axis=1), n_new).astype(jnp.int32)
  dec_BT = jnp.broadcast_to(jnp.asarray(st.decorator, jnp.int32)[None], (b, len(st.decorator)))
  return Generation(tokens=jnp.concatenate([dec_BT, new_BT], axis=1), finished=done_B,
                    lengths=lengths)


def _generate(params, key, temperature, st: _Static) -> Generation:
  return _decode(params, _prefill(params, st), key, temperature, st)


def _generate_batches(params, keys_G, temperature, st: _Static, batch_loop: str) -> Generation:
  prefix = _prefill(params, st)
  return variant_axis.over_variants(lambda k: _decode(params, prefix, k, temperature, st),
                                 batch_loop)(keys_G)


_generate_jit = jax.jit(_generate, static_argnames=("st",))
_generate_batches_jit = jax.jit(_generate_batches, static_argnames=("st", "batch_loop"))


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


def _checked(model_config, grammar, batch_size, max_new_tokens, temperature, top_k, greedy,
             replace) -> tuple[_Static, jax.Array]:
  st = _static(model_config, grammar, batch_size, max_new_tokens, greedy, top_k, replace)
  if not isinstance(temperature, jax.core.Tracer) and not greedy and not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
  return st, jnp.asarray(temperature, jnp.float32)


def _traced(*trees) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


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
  st, temperature = _checked(model_config, grammar, batch_size, max_new_tokens, temperature,
                             top_k, greedy, replace)
  if _traced(params, key):
    return _generate(params, key, temperature, st)
  try:
    hash(st)
  except TypeError:  # unhashable replacement callables: compile this call on its own
    return jax.jit(functools.partial(_generate, st=st))(params, key, temperature)
  return _generate_jit(params, key, temperature, st=st)


def generate_batches(params: model_lib.Params, model_config: model_lib.ModelConfig,
                     grammar: grammars.Grammar, keys: jax.Array, *, batch_size: int = 128,
                     max_new_tokens: int = MAX_NEW_TOKENS, temperature: float | jax.Array = 1.0,
                     top_k: int = 0, greedy: bool = False, replace: model_lib.Replace = None,
                     batch_loop: str = "auto") -> Generation:
  """`generate` for each of G keys in one call: the same tokens as G calls, the prefill shared.

  The decorator is prefilled once (every batch starts from the same prompt) and the G batches
  are sampled from it, vmapped or one after another (`lax.map`, each stopping on its own as
  soon as its rows have all emitted <eos>).

  Args:
    params, model_config, grammar, batch_size, max_new_tokens, temperature, top_k, greedy,
      replace: as in `generate`.
    keys: typed PRNG keys `[G]`; batch g is `generate(..., key=keys[g])`.
    batch_loop: `vmap`, `map`, or `auto` (`map` on a CPU backend, `vmap` elsewhere: the
      convention of `variant_axis.over_variants`).

  Returns:
    A `Generation` whose fields have a leading axis G.
  """
  chex.assert_rank(keys, 1)
  st, temperature = _checked(model_config, grammar, batch_size, max_new_tokens, temperature,
                             top_k, greedy, replace)
  batch_loop = resolve_loop(batch_loop)
  if _traced(params, keys):
    return _generate_batches(params, keys, temperature, st, batch_loop)
  try:
    hash(st)
  except TypeError:
    return jax.jit(functools.partial(_generate_batches, st=st, batch_loop=batch_loop))(
        params, keys, temperature)
  return _generate_batches_jit(params, keys, temperature, st=st, batch_loop=batch_loop)


def resolve_loop(choice: str) -> str:
  """`auto` -> `map` on a CPU backend, `vmap` elsewhere; `vmap` / `map` as given."""
  if choice not in variant_axis.VARIANT_LOOPS:
    raise ValueError(f"batch_loop={choice!r}: use one of {variant_axis.VARIANT_LOOPS}")
  if choice == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return choice


def prefill(params: model_lib.Params, model_config: model_lib.ModelConfig,
            grammar: grammars.Grammar, *, batch_size: int = 128,
            max_new_tokens: int = MAX_NEW_TOKENS,
            replace: model_lib.Replace = None) -> Prefix:
  """The decorator prompt run through the model for `batch_size` rows (call it inside jit).

  Every generation starts from the same prompt, so one `Prefix` serves any number of `decode`
  calls (keys, batches, and for a replacement that leaves the prompt alone, variants).
  """
  st = _static(model_config, grammar, batch_size, max_new_tokens, False, 0, replace)
  return _prefill(params, st)


def decode(params: model_lib.Params, model_config: model_lib.ModelConfig,
           grammar: grammars.Grammar, prefix: Prefix, key: jax.Array, *,
           max_new_tokens: int = MAX_NEW_TOKENS, temperature: float | jax.Array = 1.0,
           top_k: int = 0, greedy: bool = False,
           replace: model_lib.Replace = None) -> Generation:
  """Samples from a `prefill`ed prompt (call it inside jit): `prefill` then `decode` with the
  same replacement equals `generate` token for token.

  Args:
    params, model_config, grammar, key, temperature, top_k, greedy, replace: as in `generate`
      (`replace` acts on the generated positions only; the prompt is the prefix's).
    prefix: from `prefill` with the same `max_new_tokens`; its rows are the batch.
    max_new_tokens: the generation budget the prefix was made for.
  """
  chex.assert_shape(key, ())
  st, temperature = _checked(model_config, grammar, prefix.logits_BV.shape[0], max_new_tokens,
                             temperature, top_k, greedy, replace)
  return _decode(params, prefix, key, temperature, st)


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


def recognise(grammar: grammars.Grammar, tokens: np.ndarray) -> np.ndarray:
  """The exact recogniser's verdicts on generations `[..., T]` (bool `[...]`), all rows at once.

  One extra `<pad>` column changes no verdict and lets the recogniser accept tiny budgets.
  Concrete tokens: the CKY recogniser (English) buckets rows by sentence length, much faster
  than a chart under jit.
  """
  tokens = np.asarray(tokens)
  flat = tokens.reshape(-1, tokens.shape[-1])
  padded = np.concatenate([flat, np.full_like(flat[:, :1], grammar.pad_id)], axis=1)
  ok = np.asarray(jitted_for(grammar, grammars.is_grammatical)(padded))
  return ok.reshape(tokens.shape[:-1])


def grammaticality(params: model_lib.Params, model_config: model_lib.ModelConfig,
                   grammar: grammars.Grammar, key: jax.Array, *, num_batches: int = 5,
                   batch_size: int = 128, replace: model_lib.Replace = None,
                   max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 1.0,
                   top_k: int = 0, greedy: bool = False,
                   num_samples: int = 8, arrays: bool = False) -> dict[str, Any]:
  """Fraction of generations the exact recogniser accepts, over `num_batches` batches.

  Batch i uses `fold_in(key, i)`. A generation without `<eos>` within the budget counts as
  ungrammatical.

  Returns:
    dict with `mean` and `std` (population std over batches) of the per-batch fractions,
    `per_batch` (list), `finished` (fraction that emitted `<eos>`), `mean_length` (mean
    sentence length of the finished ones), and `samples`: the first `num_samples` sentences
    of batch 0, decoded, each marked with its verdict. With `arrays`, also `arrays`: numpy
    `lengths`, `finished` and `grammatical` of every generation (flat, batch-major).
  """
  if int(num_batches) < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  keys = jnp.stack([jax.random.fold_in(key, i) for i in range(int(num_batches))])
  gen = generate_batches(params, model_config, grammar, keys, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         greedy=greedy, replace=replace)
  tokens_GBT = np.asarray(gen.tokens)
  ok_GB = recognise(grammar, tokens_GBT)
  done_GB = np.asarray(gen.finished)
  fractions = [float(ok.mean()) for ok in ok_GB]
  lengths = np.asarray(gen.lengths)[done_GB]
  texts = grammar.decode(tokens_GBT[0, :num_samples], sentence_only=True)
  samples = [f"{'✓' if g else '✗'} {t}{'' if d else ' …(no <eos>)'}"
             for t, g, d in zip(texts, ok_GB[0], done_GB[0])]
  out = {
      "mean": float(np.mean(fractions)),
      "std": float(np.std(fractions)),
      "per_batch": fractions,
      "finished": float(done_GB.mean()),
      "mean_length": float(lengths.mean()) if lengths.size else float("nan"),
      "samples": samples,
  }
  if arrays:
    out["arrays"] = {"lengths": np.asarray(gen.lengths).reshape(-1),
                     "finished": done_GB.reshape(-1), "grammatical": ok_GB.reshape(-1)}
  return out

"""The nanoGPT-style decoder (Flax Linen) with named activation sites and splice points.

The forward pass walks a fixed sequence of named sites (`site_names`), each a `[B, T, D]` tensor:

    resid_pre.{l}   input of block l (for l = 0: token + position embeddings)
    attn_out.{l}    attention branch output, before it is added to the residual stream
    mlp_in.{l}      the MLP's input: ln_2 of the residual stream after attention (a transcoder's
                    input; replacing it changes only what MLP l reads, not the residual stream)
    mlp_out.{l}     MLP branch output, before it is added to the residual stream (replacing it
                    splices an MLP replacement, e.g. a transcoder, in place of MLP l)
    resid_post.{l}  output of block l (the same tensor as resid_pre.{l+1})
    ln_final        output of the final LayerNorm, the input of the tied unembedding

At every site a caller may replace the activation with `f(x_BTD) -> x_BTD` (an SAE, a clamp, an
ablation, a patch), collect it, or stop the forward there. Replacements run in forward order
whatever order they are given in; so `resid_post.{l}` is replaced before `resid_pre.{l+1}`, and
block l+1 sees both. `apply_from` resumes the forward from a residual-stream site given its
activation, which lets SAE training run the clean model to the SAE site once and then vmap spliced
forwards of many SAE variants from there.

Params are the plain params pytree (`init` returns `variables['params']`), always float32:

    wte [V, D] (tied unembedding), wpe [context, D], ln_f/scale [D],
    block_{l}/{ln_1,ln_2}/scale [D], block_{l}/attn/c_attn/kernel [D, 3D] (q, k, v in that order),
    block_{l}/attn/c_proj/kernel [D, D], block_{l}/mlp/c_fc/kernel [D, d_mlp],
    block_{l}/mlp/c_proj/kernel [d_mlp, D].

`apply` and `apply_from` wrap params in `jax.lax.stop_gradient` unless `trainable=True`, so a
gradient taken through them reaches only what the replacement functions close over.

`decode.init_cache` / `decode.decode_step` run the same forward incrementally with a KV cache (a
prompt chunk, then one position at a time) for generation; they honour the same sites,
replacements and collection (`make_plan`, `visit_site`), applied to the new positions'
activations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Params = Any  # the params pytree returned by `init`
ReplaceFn = Callable[[jax.Array], jax.Array]
Replace = Union[Mapping[str, ReplaceFn], Sequence[tuple[str, ReplaceFn]], None]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model shape (hashable, so it can be a `jit` static argument).

  Attributes:
    vocab_size: number of token ids.
    n_layers: transformer blocks.
    n_heads: attention heads; `d_model` must be divisible by it.
    d_model: residual stream width.
    d_mlp: MLP hidden width.
    context: number of learned position embeddings (the longest sequence accepted).
    ln_eps: LayerNorm epsilon.
    init_std: std of the N(0, std) init of linear and embedding weights; the residual output
      projections use `init_std / sqrt(2 * n_layers)`.
    dtype: compute dtype; params are always float32 and logits are returned in float32.
  """

  vocab_size: int
  n_layers: int = 2
  n_heads: int = 2
  d_model: int = 128
  d_mlp: int = 512
  context: int = 256
  ln_eps: float = 1e-5
  init_std: float = 0.02
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "n_layers", "n_heads", "d_model", "d_mlp", "context"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
    for name in ("ln_eps", "init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}.")
    if self.d_model % self.n_heads:
      raise ValueError(
          f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
          f"change one of them.")
    if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
      raise ValueError(f"ModelConfig.dtype must be a floating dtype, got {self.dtype!r}.")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


@flax.struct.dataclass
class ForwardResult:
  """What `apply` / `apply_from` return.

  Attributes:
    logits: `[B, T, V]` float32 next-token logits, or None when the forward stopped early.
    acts: site name -> `[B, T, D]` activation (after any replacement at that site) for every
      collected site.
  """

  logits: jax.Array | None
  acts: dict[str, jax.Array]


def site_names(config: ModelConfig) -> tuple[str, ...]:
  """All activation sites in forward order."""
  names = []
  for l in range(config.n_layers):
    names += [f"resid_pre.{l}", f"attn_out.{l}", f"mlp_in.{l}", f"mlp_out.{l}",
              f"resid_post.{l}"]
  return tuple(names) + ("ln_final",)


# ------------------------------------------------------------------------------------------------
# Modules.


def _normal(std: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=std)


def causal_attention(q_BTH: jax.Array, k_BTH: jax.Array, v_BTH: jax.Array) -> jax.Array:
  """One head's softmax(q kᵀ / √H + causal mask) v; `[B, T, H]` in and out, softmax in float32."""
  h = q_BTH.shape[-1]
  t = q_BTH.shape[1]
  scores_BTS = jnp.einsum("bth,bsh->bts", q_BTH, k_BTH).astype(jnp.float32) / math.sqrt(h)
  causal_TS = jnp.tril(jnp.ones((t, t), bool))
  scores_BTS = jnp.where(causal_TS[None], scores_BTS, jnp.finfo(jnp.float32).min)
  probs_BTS = jax.nn.softmax(scores_BTS, axis=-1).astype(v_BTH.dtype)
  return jnp.einsum("bts,bsh->bth", probs_BTS, v_BTH)


class _Kernel(nn.Module):
  """A bias-free `Dense`'s kernel on its own (same name and init), for sliced use."""

  shape: tuple[int, int]
  std: float

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", _normal(self.std), self.shape)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with a fused, bias-free QKV kernel.

  Each head's q, k and v come from their own `[D, H]` column block of the kernel and attend with
  batch-leading `[B, T, H]` multiplies; the heads' outputs are concatenated for the output
  projection. The same arithmetic as one `[D, 3D]` projection split into `[B, T, N, H]` heads,
  without the head transposes: on XLA's CPU backend forward + backward through block 1 at B 32,
  T 128, 2 heads of 64 takes about 5.7 ms this way against 7.1-7.9 ms with batch and heads merged
  into one `[B·N, T, H]` axis (and 25 ms for the `[B, T, N, H]` einsum of
  `jax.nn.dot_product_attention`).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.config
    d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
    # nanoGPT's column order (q, k, v, then heads), so its checkpoints map one-to-one.
    w_DGNH = _Kernel((d, 3 * d), cfg.init_std, name="c_attn")().astype(cfg.dtype).reshape(
        d, 3, n, h)
    x_BTD = x_BTD.astype(cfg.dtype)
    heads = [causal_attention(*(x_BTD @ w_DGNH[:, g, i] for g in range(3))) for i in range(n)]
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return nn.Dense(d, use_bias=False, kernel_init=_normal(resid_std), dtype=cfg.dtype,
                    name="c_proj")(jnp.concatenate(heads, axis=-1))


class MLP(nn.Module):
  """Bias-free `D -> d_mlp -> D` MLP with exact (erf) GELU."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.config
    h_BTM = nn.Dense(cfg.d_mlp, use_bias=False, kernel_init=_normal(cfg.init_std), dtype=cfg.dtype,
                     name="c_fc")(x_BTD)
    h_BTM = nn.gelu(h_BTM, approximate=False)
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return nn.Dense(cfg.d_model, use_bias=False, kernel_init=_normal(resid_std), dtype=cfg.dtype,
                    name="c_proj")(h_BTM)


def layer_norm(config: ModelConfig) -> nn.LayerNorm:
  """The model's LayerNorm: exact two-pass variance (as torch does), scale only."""
  return nn.LayerNorm(epsilon=config.ln_eps, use_bias=False, use_fast_variance=False,
                      dtype=config.dtype)


class Block(nn.Module):
  """Pre-LN block, exposed as its two branches so the caller can splice between them."""

  config: ModelConfig

  def setup(self):
    self.ln_1 = layer_norm(self.config)
    self.attn = CausalSelfAttention(self.config)
    self.ln_2 = layer_norm(self.config)
    self.mlp = MLP(self.config)

  def attn_branch(self, x_BTD: jax.Array) -> jax.Array:
    return self.attn(self.ln_1(x_BTD))

  def mlp_branch(self, x_BTD: jax.Array) -> jax.Array:
    return self.mlp(self.ln_2(x_BTD))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Validated, static description of one forward: where it starts, what it does at each site."""

  start: str | None  # site whose value the input is; None: the input is tokens
  replace: Mapping[str, tuple[ReplaceFn, ...]]
  collect: tuple[str, ...]
  stop_at: str | None

def visit_site(plan: Plan, acts: dict[str, jax.Array], name: str, v_BTD: jax.Array) -> jax.Array:
  """Applies the plan's replacements at a site (in order) and records it if collected."""
  # The start site's value is given, so its replacement is not applied again.
  if name != plan.start:
    for fn in plan.replace.get(name, ()):
      out = fn(v_BTD)
      if getattr(out, "shape", None) != v_BTD.shape:
        raise ValueError(f"Replacement at site {name!r} must return shape {v_BTD.shape}, got "
                         f"{getattr(out, 'shape', type(out))}.")
      v_BTD = out.astype(v_BTD.dtype)
  if name in plan.collect or name == plan.stop_at:
    acts[name] = v_BTD
  return v_BTD


class Transformer(nn.Module):
  """The decoder. Use the module-level `init` / `apply` / `apply_from` rather than its methods."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.wte = self.param("wte", _normal(cfg.init_std), (cfg.vocab_size, cfg.d_model))
    self.wpe = self.param("wpe", _normal(cfg.init_std), (cfg.context, cfg.d_model))
    # Flax names list entries `block_0`, `block_1`, ...
    self.block = [Block(cfg) for _ in range(cfg.n_layers)]
    self.ln_f = layer_norm(cfg)

  def __call__(self, tokens_BT: jax.Array, plan: Plan | None = None) -> ForwardResult:
    t = tokens_BT.shape[1]
    # `take` (mode "fill") makes out-of-range ids NaN rather than silently clamping them.
    tok_BTD = jnp.take(self.wte, tokens_BT, axis=0)
    x_BTD = (tok_BTD + self.wpe[:t][None]).astype(self.config.dtype)
    return self._walk(x_BTD, plan or Plan(None, {}, (), None))

  def forward_from(self, x_BTD: jax.Array, plan: Plan) -> ForwardResult:
    return self._walk(x_BTD.astype(self.config.dtype), plan)

  def _walk(self, x_BTD: jax.Array, plan: Plan) -> ForwardResult:
    cfg = self.config
    acts = {}

    def site(name: str, v_BTD: jax.Array) -> jax.Array:
      return visit_site(plan, acts, name, v_BTD)

    early = ForwardResult(logits=None, acts=acts)  # `acts` fills in as the walk goes

    kind, _, layer = (plan.start or "resid_pre.0").partition(".")
    if kind == "resid_pre":
      first_layer = int(layer)
    elif kind == "resid_post":
      first_layer = int(layer) + 1
      x_BTD = site(plan.start, x_BTD)  # collects it; resid_pre.{l+1} is a later site
    else:  # ln_final
      first_layer = cfg.n_layers

    for l in range(first_layer, cfg.n_layers):
      block = self.block[l]
      x_BTD = site(f"resid_pre.{l}", x_BTD)
      if plan.stop_at == f"resid_pre.{l}":
        return early
      a_BTD = site(f"attn_out.{l}", block.attn_branch(x_BTD))
      if plan.stop_at == f"attn_out.{l}":
        return early
      x_BTD = x_BTD + a_BTD
      h_BTD = site(f"mlp_in.{l}", block.ln_2(x_BTD))
      if plan.stop_at == f"mlp_in.{l}":
        return early
      m_BTD = site(f"mlp_out.{l}", block.mlp(h_BTD))
      if plan.stop_at == f"mlp_out.{l}":
        return early
      x_BTD = site(f"resid_post.{l}", x_BTD + m_BTD)
      if plan.stop_at == f"resid_post.{l}":
        return early

    h_BTD = site("ln_final", x_BTD if kind == "ln_final" else self.ln_f(x_BTD))
    if plan.stop_at == "ln_final":
      return early
    # Tied unembedding, accumulated in float32 whatever the compute dtype.
    logits_BTV = jnp.einsum("btd,vd->btv", h_BTD, self.wte.astype(h_BTD.dtype),
                            preferred_element_type=jnp.float32)
    return ForwardResult(logits=logits_BTV, acts=acts)


# ------------------------------------------------------------------------------------------------
# Public functions.


def init(key: jax.Array, config: ModelConfig) -> Params:
  """Initialises the model; returns the params pytree (float32), without the `'params'` wrapper."""
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  # Jitted: one compile instead of hundreds of eager dispatches.
  return jax.jit(lambda k: Transformer(config).init(k, tokens_BT)["params"])(key)


def count_params(params: Params, include_positions: bool = False) -> int:
  """Number of parameters; the tied `wte` counts once, `wpe` only if `include_positions`.

  Works on arrays and on `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
  """
  _check_params(params)
  counted = {k: v for k, v in params.items() if include_positions or k != "wpe"}
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(counted))


def apply(params: Params, tokens_BT: jax.Array, config: ModelConfig, *, replace: Replace = None,
          collect: Iterable[str] = (), stop_at: str | None = None,
          trainable: bool = False) -> ForwardResult:
  """Runs the model on tokens, with optional replacements, collection and early stop.

  Args:
    params: the params pytree from `init`.
    tokens_BT: int token ids, `[B, T]` with `T <= config.context`.
    config: the model config.
    replace: site -> `f(x_BTD) -> x_BTD`, as a dict or a sequence of `(site, fn)` pairs. Functions
      run in forward order of their sites (e.g. `resid_post.0` before `resid_pre.1`, which block 1
      then sees); several functions for one site (pairs only) compose in the order given. `f`
      may close over traced values (SAE params); gradients and vmap flow through it. Its output
      is cast to the compute dtype.
    collect: sites whose activations (after replacement) are returned in `acts`.
    stop_at: if set, return right after this site (replaced and put in `acts`) with
      `logits=None`, without computing later sites. `collect`/`replace` may not name later sites.
    trainable: if False (default) params are wrapped in `stop_gradient`; True for LM training.

  Returns:
    A `ForwardResult`.

  Raises:
    ValueError: unknown site names (the message lists the valid ones), sites after `stop_at`,
      bad shapes. Raised in Python, before the model is traced.
  """
  chex.assert_rank(tokens_BT, 2)
  chex.assert_type(tokens_BT, int)
  if tokens_BT.shape[1] > config.context:
    raise ValueError(f"Sequence length {tokens_BT.shape[1]} exceeds the model context "
                     f"{config.context}.")
  plan = make_plan(config, None, replace, collect, stop_at)
  return Transformer(config).apply({"params": maybe_freeze(params, trainable)}, tokens_BT, plan)


def apply_from(params: Params, site: str, x_BTD: jax.Array, config: ModelConfig, *,
               replace: Replace = None, collect: Iterable[str] = (),
               trainable: bool = False) -> ForwardResult:
  """Continues the forward from `site`, whose activation is `x_BTD`, to the logits.

  Supported start sites: `resid_pre.{l}`, `resid_post.{l}` and `ln_final` (attn_out/mlp_in/mlp_out
  are not: resuming there needs the residual stream too). `x_BTD` is taken as the value at `site`
  after any replacement: a replacement given for `site` itself is NOT applied again (so the same
  `replace` dict used for the clean run can be passed). Starting at `resid_post.{l}` still applies
  a replacement at `resid_pre.{l+1}`; starting at `resid_pre.{l+1}` does not apply one at
  `resid_post.{l}`.

  Args:
    params: the params pytree from `init`.
    site: the start site.
    x_BTD: its activation, `[B, T, D]`.
    config: the model config.
    replace: as in `apply`; may only name `site` (ignored) and later sites.
    collect: as in `apply`; may only name `site` (returned as given) and later sites.
    trainable: as in `apply`.

  Returns:
    A `ForwardResult` with logits.

  Raises:
    ValueError: unknown or unsupported start site, sites before `site`, bad shapes.
  """
  _check_sites(config, [site], "apply_from site")
  if site.split(".")[0] not in ("resid_pre", "resid_post", "ln_final"):
    raise ValueError(f"apply_from cannot resume from {site!r}: supported start sites are "
                     f"resid_pre.{{l}}, resid_post.{{l}} and ln_final.")
  chex.assert_rank(x_BTD, 3)
  if x_BTD.shape[-1] != config.d_model:
    raise ValueError(f"x_BTD has width {x_BTD.shape[-1]}, expected d_model={config.d_model}.")
  plan = make_plan(config, site, replace, collect, None)
  return Transformer(config).apply({"params": maybe_freeze(params, trainable)}, x_BTD, plan,
                                   method=Transformer.forward_from)


# ------------------------------------------------------------------------------------------------
# Validation helpers.


def _check_params(params: Params) -> None:
  if isinstance(params, Mapping) and "params" in params and "wte" not in params:
    raise ValueError("Pass the params pytree (what `init` returns), not a {'params': ...} dict.")


def maybe_freeze(params: Params, trainable: bool) -> Params:
  """Checks the params pytree; wraps it in `stop_gradient` unless `trainable`."""
  _check_params(params)
  return params if trainable else jax.lax.stop_gradient(params)


def _check_sites(config: ModelConfig, names: Iterable[str], what: str) -> None:
  valid = site_names(config)
  bad = [n for n in names if n not in valid]
  if bad:
    raise ValueError(f"Unknown {what} {', '.join(map(repr, bad))}; valid sites are: "
                     f"{', '.join(valid)}.")


def make_plan(config: ModelConfig, start: str | None, replace: Replace, collect: Iterable[str],
              stop_at: str | None) -> Plan:
  """Normalises and validates the per-site requests against the site order."""
  if replace is None:
    pairs = []
  elif isinstance(replace, Mapping):
    pairs = list(replace.items())
  else:
    pairs = [tuple(p) for p in replace]
  collect = (collect,) if isinstance(collect, str) else tuple(collect)
  _check_sites(config, [n for n, _ in pairs], "replace site")
  _check_sites(config, collect, "collect site")
  if stop_at is not None:
    _check_sites(config, [stop_at], "stop_at site")
  for name, fn in pairs:
    if not callable(fn):
      raise TypeError(f"replace[{name!r}] must be a callable x_BTD -> x_BTD, got {type(fn)}.")

  order = {n: i for i, n in enumerate(site_names(config))}
  named = [("replace", n) for n, _ in pairs] + [("collect", n) for n in collect]
  if start is not None:
    early = [f"{w} {n!r}" for w, n in named if order[n] < order[start]]
    if early:
      raise ValueError(f"apply_from({start!r}) cannot act on earlier sites: {', '.join(early)}.")
  if stop_at is not None:
    late = [f"{w} {n!r}" for w, n in named if order[n] > order[stop_at]]
    if late:
      raise ValueError(f"stop_at={stop_at!r} ends the forward before {', '.join(late)}.")

  by_site: dict[str, tuple[ReplaceFn, ...]] = {}
  for name, fn in pairs:
    by_site[name] = by_site.get(name, ()) + (fn,)
  return Plan(start=start, replace=by_site, collect=collect, stop_at=stop_at)

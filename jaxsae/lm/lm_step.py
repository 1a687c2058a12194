"""What one LM run computes: its state, data streams, objective, compiled steps and evaluation.

The recipe is the spec's (`specs/model.md`): next-token cross-entropy on `seq[:, :-1] ->
seq[:, 1:]`, pad targets ignored, mean over each sequence's targets then over the batch
(decorator targets included unless `mask_decorator`); AdamW (0.9, 0.95) with weight decay on
>= 2-D params only, global-norm clipping; linear warm-up then cosine decay of the learning rate.

Everything a step needs happens on device: the batch of step s is
`grammars.sample(fold_in(data_key, s), ...)`, drawn inside the jitted step, and `lax.scan` runs
`steps_per_call` optimizer steps per host call with the state buffers donated. So the data is a
pure function of (seed, step) and a resumed run is bit-identical to an uninterrupted one (CPU).

Key schedule (root = `jax.random.key(config.seed)`, stored in the state as `key`):

    fold_in(root, 0)                 params init
    fold_in(fold_in(root, 1), s)     training batch of step s
    fold_in(fold_in(root, 2), i)     held-out batch i (CE and grammatical mass; the same
                                     `eval.batches` batches at every evaluation)
    fold_in(root, 3)                 periodic generation sample (same key at every evaluation)
    fold_in(root, 4)                 final generation sample (5 x 128 by default)

Training and held-out keys come from different branches of the key tree, so they never
coincide (the sentences themselves may: short sentences are common in every stream).

The `lm` job (`train_lm`) drives these functions and owns the workdir; `interop.lm_export`
re-draws the same streams (`training_batch`, `make_eval_set(config, heldout_key(config))`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsae import grammars
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import model as model_lib

# Branches of the run's root key (module docstring).
INIT_STREAM, DATA_STREAM, HELDOUT_STREAM, GEN_STREAM, FINAL_GEN_STREAM = range(5)


@flax.struct.dataclass
class TrainState:
  """Everything that evolves during training (checkpointed as one pytree)."""

  step: jax.Array  # int32 scalar: optimizer steps taken
  params: model_lib.Params
  opt_state: optax.OptState
  key: jax.Array  # typed PRNG key: the run's root key


LOSS_REDUCTIONS = ("sequence", "token")  # `loss_from_logits`'s reductions


@dataclasses.dataclass(frozen=True)
class Setup:
  """Static (shape / trace-defining) part of a run; numeric hyperparameters are traced."""

  model_config: model_lib.ModelConfig
  language: str
  batch_size: int
  max_len: int
  mask_decorator: bool
  steps_per_call: int
  loss_reduction: str  # LOSS_REDUCTIONS


# ------------------------------------------------------------------------------------------------
# The run's shape and hyperparameters.


def model_config_for(config) -> model_lib.ModelConfig:
  """The model shape of a run (vocabulary from the grammar)."""
  grammar = grammars.get(config.language)
  m = config.model
  return model_lib.ModelConfig(vocab_size=grammar.vocab_size, n_layers=m.n_layers,
                               n_heads=m.n_heads, d_model=m.d_model, d_mlp=m.d_mlp,
                               context=m.context)


def setup_for(config) -> Setup:
  """The static part of the run of `config` (what the compiled steps are specialised on)."""
  return Setup(model_config=model_config_for(config), language=config.language,
               batch_size=config.batch_size, max_len=config.max_len,
               mask_decorator=bool(config.mask_decorator), steps_per_call=config.steps_per_call,
               loss_reduction=config.loss_reduction)


def hyper_for(config) -> dict[str, jax.Array]:
  """Numeric hyperparameters, passed traced so that changing them does not recompile."""
  o = config.optim
  out = {k: jnp.float32(o[k]) for k in ("peak_lr", "end_lr", "b1", "b2", "weight_decay",
                                        "grad_clip")}
  out["warmup_steps"] = jnp.int32(o.warmup_steps)
  out["decay_steps"] = jnp.int32(o.decay_steps)
  out["debug_nan_step"] = jnp.int32(config.debug_nan_step)
  return out


# ------------------------------------------------------------------------------------------------
# The objective and the optimizer.


def learning_rate(step: jax.Array, hyper: dict[str, jax.Array]) -> jax.Array:
  """Linear warm-up to `peak_lr` over `warmup_steps`, then cosine to `end_lr` at `decay_steps`.

  Step s < warmup uses peak * (s + 1) / warmup (so step 0 already moves); from `decay_steps` on
  the rate stays at `end_lr`.
  """
  s = jnp.asarray(step, jnp.float32)
  warm = hyper["warmup_steps"].astype(jnp.float32)
  span = jnp.maximum(hyper["decay_steps"].astype(jnp.float32) - warm, 1.0)
  frac = jnp.clip((s - warm) / span, 0.0, 1.0)
  cosine = hyper["end_lr"] + (hyper["peak_lr"] - hyper["end_lr"]) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
  return jnp.where(s < warm, hyper["peak_lr"] * (s + 1) / jnp.maximum(warm, 1.0), cosine)


def make_optimizer(hyper: dict[str, jax.Array]) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW with decoupled weight decay on >= 2-D params only."""
  return optax.chain(
      optax.clip_by_global_norm(hyper["grad_clip"]),
      optax.adamw(learning_rate=lambda count: learning_rate(count, hyper), b1=hyper["b1"],
                  b2=hyper["b2"], eps=1e-8, weight_decay=hyper["weight_decay"],
                  mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))


def sequence_loss(params: model_lib.Params, tokens_BT: jax.Array,
                  model_config: model_lib.ModelConfig, *, pad_id: int, mask_decorator: bool,
                  decorator_len: int = 7, reduction: str = "sequence") -> jax.Array:
  """Next-token CE over the non-pad targets, reduced as `reduction` says (`loss_from_logits`).

  With `mask_decorator`, targets inside the decorator (positions 1..6) are excluded too; the
  target after `Out:` (the first sentence token) always counts.
  """
  logits_BTV = model_lib.apply(params, tokens_BT[:, :-1], model_config, trainable=True).logits
  return loss_from_logits(logits_BTV, tokens_BT, pad_id=pad_id, mask_decorator=mask_decorator,
                          decorator_len=decorator_len, reduction=reduction)


def loss_from_logits(logits_BTV: jax.Array, tokens_BT: jax.Array, *, pad_id: int,
                     mask_decorator: bool, decorator_len: int = 7,
                     reduction: str = "sequence") -> jax.Array:
  """`sequence_loss` given the logits of `tokens_BT[:, :-1]` (`[B, T-1, V]`).

  `reduction='sequence'` (the spec's): the mean over each sequence's targets, then over the
  batch, which weights a token of a short sentence more than one of a long sentence (and so
  the `<eos>` that ends it: models trained so generate shorter sentences than their data);
  `'token'`: the mean over every target of the batch, the maximum-likelihood loss of the
  token distribution. The held-out CE (`evaluate`) always uses 'sequence'.
  """
  targets_BT = tokens_BT[:, 1:]
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  mask_BT = targets_BT != pad_id
  if mask_decorator:
    mask_BT = mask_BT & (jnp.arange(targets_BT.shape[1])[None, :] >= decorator_len - 1)
  if reduction == "token":
    return jnp.sum(jnp.where(mask_BT, ce_BT, 0.0)) / jnp.maximum(jnp.sum(mask_BT), 1)
  per_seq_B = jnp.sum(jnp.where(mask_BT, ce_BT, 0.0), axis=1) / jnp.maximum(
      jnp.sum(mask_BT, axis=1), 1)
  return jnp.mean(per_seq_B)


def training_batch(config, step: int) -> grammars.Batch:
  """The batch the run of `config` trains on at optimizer step `step` (its data stream)."""
  data_key = jax.random.fold_in(jax.random.key(config.seed), DATA_STREAM)
  return grammars.sample(jax.random.fold_in(data_key, step), grammars.get(config.language),
                         config.batch_size, config.max_len)


def heldout_key(config) -> jax.Array:
  """The key of the run's held-out set (`make_eval_set(config, heldout_key(config))`)."""
  return jax.random.fold_in(jax.random.key(config.seed), HELDOUT_STREAM)


def init_state(config) -> TrainState:
  """A fresh state from `config.seed` (one compilation per model shape)."""
  return init_state_from(jax.random.key(config.seed), hyper_for(config), setup_for(config))


@functools.partial(jax.jit, static_argnames=("setup",))
def init_state_from(root: jax.Array, hyper: dict[str, jax.Array], setup: Setup) -> TrainState:
  """`init_state` from its parts (`jax.eval_shape` of it is a checkpoint's restore template)."""
  params = model_lib.init(jax.random.fold_in(root, INIT_STREAM), setup.model_config)
  opt_state = make_optimizer(hyper).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, key=root)


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnums=(0,))
def train_steps(state: TrainState, hyper: dict[str, jax.Array],
                setup: Setup) -> tuple[TrainState, dict[str, jax.Array]]:
  """`setup.steps_per_call` optimizer steps (`lax.scan`); returns per-step metrics `[K]`."""
  grammar = grammars.get(setup.language)
  tx = make_optimizer(hyper)
  data_key = jax.random.fold_in(state.key, DATA_STREAM)

  def one(state: TrainState, _):
    batch = grammars.sample(jax.random.fold_in(data_key, state.step), grammar, setup.batch_size,
                            setup.max_len)
    poison = state.step == hyper["debug_nan_step"]  # test hook: NaN params at that step

    def loss_of(params):
      params = jax.tree.map(lambda p: jnp.where(poison, jnp.nan, p), params)
      return sequence_loss(params, batch.tokens, setup.model_config, pad_id=grammar.pad_id,
                           mask_decorator=setup.mask_decorator,
                           decorator_len=grammar.prefix_len, reduction=setup.loss_reduction)

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate(state.step, hyper)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.lax.scan(one, state, None, length=setup.steps_per_call)


# ------------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Held-out batches and their grammatical-next-token sets (host arrays, built once)."""

  tokens_NBT: np.ndarray
  valid_NBTV: np.ndarray  # bool: valid_next of each prefix
  predict_NBT: np.ndarray  # bool: input positions whose target is a sentence token or <eos>
  rejection_rate: float  # fraction of draws the sampler's length filter rejected
  mean_length: float  # mean sentence length (tokens)
  lengths: np.ndarray  # every held-out sentence's length (tokens)


def make_eval_set(config, key: jax.Array) -> EvalSet:
  """`config.eval.batches` held-out batches drawn from `fold_in(key, i)`."""
  grammar = grammars.get(config.language)
  tokens, valid, predict, rejections, lengths = [], [], [], 0, []
  for i in range(config.eval.batches):
    batch = grammars.sample(jax.random.fold_in(key, i), grammar, config.eval.batch_size,
                            config.max_len)
    toks = np.asarray(batch.tokens)
    tokens.append(toks)
    # Concrete input: English uses the length-bucketed CKY path (fast).
    valid.append(np.asarray(generate_lib.jitted_for(grammar, grammars.valid_next)(toks)))
    target_is_sentence = np.asarray(batch.sentence_mask)[:, 1:] | (toks[:, 1:] == grammar.eos_id)
    predict.append(np.concatenate([target_is_sentence, np.zeros_like(toks[:, :1], bool)], 1))
    rejections += int(np.asarray(batch.rejections).sum())
    lengths.append(np.asarray(batch.lengths))
  lengths = np.concatenate(lengths)
  return EvalSet(np.stack(tokens), np.stack(valid), np.stack(predict),
                 rejection_rate=rejections / (rejections + lengths.size),
                 mean_length=float(lengths.mean()), lengths=lengths)


@functools.partial(jax.jit, static_argnames=("setup",))
def _eval_batch(params, tokens_BT, valid_BTV, predict_BT, setup: Setup) -> dict[str, jax.Array]:
  grammar = grammars.get(setup.language)
  # One forward over all T positions; the last position's logits are unused by the CE.
  logits_BTV = model_lib.apply(params, tokens_BT, setup.model_config).logits
  ce = loss_from_logits(logits_BTV[:, :-1], tokens_BT, pad_id=grammar.pad_id,
                        mask_decorator=setup.mask_decorator, decorator_len=grammar.prefix_len)
  mass_BT = jnp.sum(jax.nn.softmax(logits_BTV, axis=-1) * valid_BTV, axis=-1)
  return {"ce": ce, "mass_sum": jnp.sum(jnp.where(predict_BT, mass_BT, 0.0)),
          "mass_count": jnp.sum(predict_BT)}


def evaluate(params: model_lib.Params, eval_set: EvalSet, setup: Setup) -> dict[str, float]:
  """Held-out CE (the training loss's reduction, averaged over batches) and grammatical mass.

  The grammatical next-token mass is the model's probability on the tokens `valid_next`
  allows, averaged over every input position whose target is a sentence token or `<eos>`
  (i.e. from `Out:` through the last sentence token), token-weighted over the eval set.
  """
  ces, mass, count = [], 0.0, 0
  for i in range(eval_set.tokens_NBT.shape[0]):
    out = _eval_batch(params, eval_set.tokens_NBT[i], eval_set.valid_NBTV[i],
                      eval_set.predict_NBT[i], setup)
    ces.append(float(out["ce"]))
    mass += float(out["mass_sum"])
    count += int(out["mass_count"])
  return {"eval_ce": float(np.mean(ces)), "grammatical_next_token_mass": mass / max(count, 1)}

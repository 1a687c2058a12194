"""Codes of a trained SAE grid on held-out tokens, the input of feature recovery.

`analysis_batch(trained, key, B)` samples B sequences from the grid's grammar with their
ground-truth labels and selects the tokens the grid trained on (`setup.positions`);
`collect_codes(trained, g, tokens, mask)` runs the frozen LM once to the SAE site and encodes
the selected tokens with every variant of group g. The scores on these codes are in
`recovery.py` (pure functions of arrays).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import grammars
from jaxsae.analysis import recovery
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import trained as trained_lib
from jaxsae.lm import model as model_lib


@dataclasses.dataclass(frozen=True)
class AnalysisBatch:
  """Held-out tokens for analysis, selected as the grid's training selected them.

  Attributes:
    tokens_BT: int32 token ids (the first `forward_len` positions).
    mask_BT: bool, the tokens the SAEs were trained on (`setup.positions`).
    labels: name → int32 `[B, T]` (`grammars.labels`, −1 undefined).
    info: name → `LabelInfo`.
  """

  tokens_BT: np.ndarray
  mask_BT: np.ndarray
  labels: dict[str, np.ndarray]
  info: dict[str, grammars.LabelInfo]

  def label_matrix(self) -> recovery.LabelMatrix:
    """The labels of the selected tokens, aligned with `collect_codes(..., self.mask_BT)`."""
    return recovery.label_matrix(self.labels, self.info, self.mask_BT)


def analysis_batch(trained: trained_lib.TrainedGrid, key: jax.Array,
                   num_sequences: int) -> AnalysisBatch:
  """Samples sequences from the grid's grammar (use a key unrelated to the training data).

  Args:
    trained: the grid (`trained.load(workdir)`).
    key: typed PRNG key.
    num_sequences: B.
  """
  if not isinstance(num_sequences, int) or num_sequences < 1:
    raise ValueError(f"num_sequences={num_sequences!r} must be a positive int.")
  setup = trained.setup
  g = setup.grammar
  data = grammars.sample(key, g, num_sequences, setup.max_len)
  tokens = data.tokens
  labels = grammars.labels(g, tokens)
  t = setup.forward_len
  mask = grammars.selected_mask(g, data, setup.positions, t)
  return AnalysisBatch(tokens_BT=np.asarray(tokens[:, :t], np.int32),
                       mask_BT=np.asarray(mask, bool),
                       labels={k: np.asarray(v[:, :t], np.int32) for k, v in labels.items()},
                       info=dict(grammars.label_info(g)))


@functools.partial(jax.jit, static_argnames=("config", "site"))
def _site_acts(lm_params, tokens_BT, *, config, site):
  return model_lib.apply(lm_params, tokens_BT, config, stop_at=site).acts[site]


@functools.partial(jax.jit, static_argnames=("config",))
def _encode_variants(params, hparams, sae_state, x_MD, *, config):
  enc = lambda p, h, s: sae_lib.encode(p, x_MD, config, h, state=s)
  return jax.vmap(enc)(params, hparams, sae_state)


def site_activations(trained: trained_lib.TrainedGrid, tokens_BT: Any, mask_BT: Any
                     ) -> np.ndarray:
  """The SAE site's activations `[M, D]` (float32) of the selected tokens, in the row-major
  order of `collect_codes` and `label_matrix(..., mask)`."""
  setup = trained.setup
  acts_BTD = _site_acts(trained.lm.params, jnp.asarray(np.asarray(tokens_BT), jnp.int32),
                        config=setup.model_config, site=setup.site)
  return np.asarray(acts_BTD, np.float32)[np.asarray(mask_BT).astype(bool)]


@functools.partial(jax.jit, static_argnames=("config",))
def _decode_variants(params, codes_NMF, *, config):
  return jax.vmap(lambda p, c: sae_lib.decode(p, c, config))(params, codes_NMF)


def reconstructions(trained: trained_lib.TrainedGrid, spec_index: int, codes_NMF: Any,
                    variants: Sequence[int] | None = None) -> np.ndarray:
  """`sae.decode` of `collect_codes(trained, spec_index, ..., variants)`: `[N, M, D]` in the
  SAE's space (the normalised one for `input_norm` / `recon_norm` SAEs)."""
  spec = trained.setup.specs[spec_index]
  idx = np.arange(spec.size) if variants is None else np.asarray(variants, np.int64)
  params = jax.tree.map(lambda a: jnp.asarray(a)[idx], trained.state.groups[spec_index].params)
  return np.asarray(_decode_variants(params, jnp.asarray(codes_NMF, jnp.float32),
                                     config=spec.sae))


def collect_codes(trained: trained_lib.TrainedGrid, spec_index: int, tokens_BT: Any,
                  mask_BT: Any, variants: Sequence[int] | None = None,
                  acts_MD: Any = None) -> jax.Array:
  """Codes of a trained group's variants on the selected tokens.

  Runs the frozen LM once to the SAE site (`stop_at`), gathers the selected tokens in row-major
  order (as `label_matrix(..., mask)` does) and encodes them with every variant (vmapped;
  inference mode, so BatchTopK uses its learned threshold).

  Args:
    trained: the grid (`trained.load(workdir)`).
    spec_index: which group (`trained.setup.specs[spec_index]`).
    tokens_BT: int token ids, `T <= ` the model context.
    mask_BT: bool, the tokens to encode (e.g. `AnalysisBatch.mask_BT`).
    variants: positions within the group (default: all `spec.size` real variants; padding
      copies are never returned).
    acts_MD: `site_activations(trained, tokens_BT, mask_BT)` when the caller already has them
      (every group of a grid encodes the same activations); default: computed here.

  Returns:
    float32 `[N, M, F]`, M = mask_BT.sum().
  """
  setup = trained.setup
  if not 0 <= spec_index < len(setup.specs):
    raise ValueError(f"spec_index={spec_index} out of range; the grid has {len(setup.specs)} "
                     "groups.")
  spec = setup.specs[spec_index]
  tokens_BT = np.asarray(tokens_BT)
  mask_BT = np.asarray(mask_BT).astype(bool)
  if tokens_BT.ndim != 2 or not np.issubdtype(tokens_BT.dtype, np.integer):
    raise ValueError(f"tokens_BT must be an int [B, T] array, got {tokens_BT.dtype} "
                     f"{tokens_BT.shape}.")
  if mask_BT.shape != tokens_BT.shape:
    raise ValueError(f"mask_BT shape {mask_BT.shape} differs from tokens_BT {tokens_BT.shape}.")
  if not mask_BT.any():
    raise ValueError("mask_BT selects no tokens.")
  if tokens_BT.shape[1] > setup.model_config.context:
    raise ValueError(f"tokens_BT has {tokens_BT.shape[1]} positions; the LM's context is "
                     f"{setup.model_config.context}.")
  idx = np.arange(spec.size) if variants is None else np.asarray(variants, np.int64)
  if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= spec.size:
    raise ValueError(f"variants={variants!r} must be non-empty positions in [0, {spec.size}) "
                     f"of group {spec.name}.")
  if acts_MD is None:
    acts_MD = site_activations(trained, tokens_BT, mask_BT)
  x_MD = jnp.asarray(acts_MD, jnp.float32)
  group = trained.state.groups[spec_index]
  take = lambda tree: jax.tree.map(lambda a: jnp.asarray(a)[idx], tree)
  return _encode_variants(take(group.params), take(trained.hypers[spec_index].hparams),
                          take(group.sae_state), x_MD, config=spec.sae)

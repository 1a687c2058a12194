"""Statistics of generations with the SAE spliced in and its codes edited.

`generation_stats` samples from the LM with an intervention's edited SAE reconstruction at the
site (`interventions.splice_edited`; every generated position, and optionally the decorator) and
reports exact grammaticality, length, token-class counts (`grammars.token_classes`) and, for
Dyck, nesting depth. It compiles once per static structure, with the SAE params and the
intervention as arguments.

The edits live in `interventions.py`; their effect on the next-token distribution in
`effects.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import grammars
from jaxsae.analysis import interventions
from jaxsae.grammars import token_classes as token_classes_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import model as model_lib


def _generate_impl(lm_params, sae_params, hparams, sae_state, intervention, key, temperature,
                   grammar, model_config, site, sae_config, splice_mode, batch_size,
                   max_new_tokens, include_prompt):
  def fn(x):
    # The prompt reaches the replacement as one chunk of 7 positions, each new token as 1.
    iv = intervention if include_prompt or x.shape[-2] == 1 else None
    return interventions.splice_edited(sae_params, x, sae_config, hparams, sae_state, splice_mode,
                                       iv, None, None)
  return generate_lib.generate(lm_params, model_config, grammar, key, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               replace={site: fn})


_generate_jit = jax.jit(_generate_impl, static_argnames=(
    *interventions.STATIC_ARGNAMES, "batch_size", "max_new_tokens", "include_prompt"))


def generation_stats(lm_params: model_lib.Params, model_config: model_lib.ModelConfig,
                     grammar: grammars.Grammar, site: str, sae_params: sae_lib.Params,
                     sae_config: sae_lib.SAEConfig, hparams: sae_lib.SAEHparams,
                     key: jax.Array, intervention: interventions.Intervention | None = None, *,
                     splice_mode: str = "corrected", sae_state: sae_lib.SAEState | None = None,
                     num_batches: int = 2, batch_size: int = 64,
                     max_new_tokens: int | None = None,
                     temperature: float = 1.0, include_prompt: bool = True,
                     return_tokens: bool = False) -> dict[str, Any]:
  """Statistics of generations with the SAE spliced at `site` and its codes edited.

  Compiles once per static structure (model, site, SAE config, sizes, intervention kind): the
  SAE params, hparams and the intervention's arrays are arguments. Batch i uses
  `fold_in(key, i)`, as `generate.grammaticality`, so `intervention=None` reproduces its plain
  SAE-spliced numbers.

  Args:
    intervention: applied at every position (its positions must be the scalar "everywhere");
      None: the plain splice. `patch` is not supported here (no aligned source).
    include_prompt: also edit the 7 decorator positions; False edits generated positions only.
    return_tokens: add the generated tokens (int32 [num_batches·B, 7 + max_new_tokens]).
    max_new_tokens: generation budget after the decorator; None (default): the spec's
      `generate.MAX_NEW_TOKENS`, capped to what the model's context leaves after the decorator
      (`min(MAX_NEW_TOKENS, model_config.context - grammar.prefix_len)`, the cap `evaluate`
      and `spliced_generation` apply too).
    Others: as `generate.grammaticality`.

  Returns:
    JSON-able dict: `grammatical` (mean fraction), `grammatical_std` and `per_batch`,
    `finished` (fraction that emitted `<eos>`), `mean_length` (finished sentences),
    `class_counts` (class -> mean count per sentence, <eos> excluded) and `class_fraction`
    (of sentence tokens), and for Dyck `max_depth_mean` / `max_depth_max` (deepest nesting
    of the finished sentences, counting openers +1 and closers −1).
  """
  interventions.check_site(model_config, site, sae_config, splice_mode, None)
  if intervention is not None:
    interventions.check_intervention(intervention, sae_config.width)
    if intervention.kind == "patch":
      raise ValueError("generation_stats does not support 'patch' (generations have no aligned "
                       "source); use clamp / zero / keep_only.")
    if intervention.positions.ndim:
      raise ValueError("generation_stats applies the intervention at every generated position; "
                       "build it with positions=None (use include_prompt=False to leave the "
                       "decorator alone).")
  if not (isinstance(num_batches, int) and num_batches > 0):
    raise ValueError(f"num_batches must be a positive int, got {num_batches!r}.")
  if not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if max_new_tokens is None:
    max_new_tokens = min(generate_lib.MAX_NEW_TOKENS, model_config.context - grammar.prefix_len)
  names, member_CV = token_classes_lib.token_classes(grammar)
  recogniser = generate_lib.jitted_for(grammar, grammars.is_grammatical)
  fractions, finished, lengths, all_tokens = [], [], [], []
  for i in range(num_batches):
    gen = _generate_jit(lm_params, sae_params, hparams, sae_state, intervention,
                        jax.random.fold_in(key, i), jnp.float32(temperature), grammar,
                        model_config=model_config, site=site, sae_config=sae_config,
                        splice_mode=splice_mode, batch_size=int(batch_size),
                        max_new_tokens=int(max_new_tokens), include_prompt=bool(include_prompt))
    tokens = np.asarray(gen.tokens)
    padded = np.concatenate([tokens, np.full_like(tokens[:, :1], grammar.pad_id)], axis=1)
    fractions.append(float(np.asarray(recogniser(padded)).mean()))
    finished.append(np.asarray(gen.finished))
    lengths.append(np.asarray(gen.lengths))
    all_tokens.append(tokens)
  tokens = np.concatenate(all_tokens)
  done = np.concatenate(finished)
  length = np.concatenate(lengths)
  new = tokens[:, grammar.prefix_len:]
  in_sent = np.arange(new.shape[1])[None, :] < length[:, None]
  member = member_CV[:, new] & in_sent[None]  # [C, B, N]
  class_counts = member.sum(-1)  # [C, B]
  n_tok = max(int(in_sent.sum()), 1)
  out = {
      "grammatical": float(np.mean(fractions)), "grammatical_std": float(np.std(fractions)),
      "per_batch": fractions, "finished": float(done.mean()),
      "mean_length": float(length[done].mean()) if done.any() else None,
      "class_counts": {c: float(class_counts[j].mean()) for j, c in enumerate(names) if c != "eos"},
      "class_fraction": {c: float(class_counts[j].sum() / n_tok) for j, c in enumerate(names)
                         if c != "eos"},
  }
  if token_classes_lib.family(grammar) == "dyck":
    step = np.where(member_CV[names.index("open")][new], 1,
                    np.where(member_CV[names.index("close")][new], -1, 0)) * in_sent
    depth = np.max(np.concatenate([np.zeros_like(step[:, :1]), np.cumsum(step, 1)], 1), 1)
    out["max_depth_mean"] = float(depth[done].mean()) if done.any() else None
    out["max_depth_max"] = int(depth[done].max()) if done.any() else None
  if return_tokens:
    out["tokens"] = tokens
  return out

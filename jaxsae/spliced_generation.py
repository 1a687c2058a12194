"""Spliced grammaticality: generations with each SAE of a trained grid spliced in, judged exactly.

`spliced_grammaticality(trained)` samples sequences from the LM with every variant's SAE
replacing its site during generation and runs the grammar's exact recogniser on them, next to
the clean model's fraction (specs/sae.md, "spliced-in grammaticality"). The eval job
(`evaluate.evaluate_trained`) calls it; it can also be called alone on a trained grid.

Data. Generation batch i of a variant is drawn with `fold_in(fold_in(key(seed), 1001), i)`
(`GENERATION_STREAM`), the same keys for the clean model and every variant (common random
numbers). The stream is disjoint from evaluate's held-out data (1000), SAE training's (1-3) and
the LM job's (0-4).

Where the SAE goes. `positions='all'` splices at every position, the 7-token decorator prompt
included; `'sentence'` only at the generated positions (after the decorator). Splice modes are
`sae.SPLICE_MODES` (`corrected`, `original`); for SAEs without input / recon normalisation both
modes are the same function and are generated once.

Compilation: generation runs variant by variant, but each (group, mode, positions) compiles once:
the SAE params are arguments of one jitted generation loop, not closures.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import generate as generate_lib
from jaxsae import grammars
from jaxsae import model as model_lib
from jaxsae import sae as sae_lib
from jaxsae import train_sae

GENERATION_STREAM = 1001  # generations: fold_in(key(seed), 1001), batch i: fold_in(., i)
POSITIONS = ("sentence", "all")  # where the SAE is spliced during generation


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
  """ValueError unless `value` is an int (not a bool) >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}.")


def check_options(modes: Sequence[str], positions: Sequence[str]) -> None:
  """Checks the splice modes and positions of the generations (ValueError naming the bad one).

  Args:
    modes: splice modes, each one of `sae.SPLICE_MODES`.
    positions: each one of `POSITIONS`.
  """
  for m in modes:
    if m not in sae_lib.SPLICE_MODES:
      raise ValueError(f"modes: {m!r} is unknown; use {sae_lib.SPLICE_MODES}")
  for p in positions:
    if p not in POSITIONS:
      raise ValueError(f"positions: {p!r} is unknown; use {POSITIONS}")
  if not modes or not positions:
    raise ValueError("grammaticality needs at least one mode and one positions value")


@dataclasses.dataclass(frozen=True)
class _GenStatic:
  sae: sae_lib.SAEConfig
  mode: str
  positions: str
  site: str
  model_config: model_lib.ModelConfig
  prefix_len: int
  batch_size: int
  max_new_tokens: int
  top_k: int


@functools.partial(jax.jit, static_argnames=("st",))
def _generate_spliced(lm_params, sae_params, sae_state, hparams, grammar, key, temperature, *,
                      st: _GenStatic):
  """Generations with one SAE spliced in; its params are traced, so a group compiles once."""

  def replace(x_BtD):
    # `generate` prefills the decorator (positions 0 .. prefix_len-1) in one chunk, then
    # decodes one position per step; 'sentence' leaves the decorator chunk clean.
    if x_BtD.shape[1] != 1:
      if x_BtD.shape[1] != st.prefix_len:
        raise ValueError(f"unexpected prompt chunk of {x_BtD.shape[1]} positions (expected the "
                         f"{st.prefix_len}-token decorator)")
      if st.positions == "sentence":
        return x_BtD
    return sae_lib.splice(sae_params, x_BtD, st.sae, hparams, st.mode, state=sae_state)[0]

  gen = generate_lib.generate(lm_params, st.model_config, grammar, key,
                              batch_size=st.batch_size, max_new_tokens=st.max_new_tokens,
                              temperature=temperature, top_k=st.top_k,
                              replace={st.site: replace})
  return gen.tokens, gen.finished


def _recognise(grammar: grammars.Grammar, tokens: np.ndarray) -> np.ndarray:
  # One extra <pad> column (as generate.grammaticality does) changes no verdict.
  padded = np.concatenate([tokens, np.full_like(tokens[:, :1], grammar.pad_id)], axis=1)
  return np.asarray(generate_lib.jitted_for(grammar, grammars.is_grammatical)(padded))


def _gen_settings(trained_or_parts, max_new_tokens, temperature, top_k):
  """(setup, lm_params, group states, hypers, generation settings) from either input form."""
  if isinstance(trained_or_parts, train_sae.Trained):
    t = trained_or_parts
    setup, lm_params, states, hypers = t.setup, t.lm.params, t.state.groups, t.hypers
    lm_eval = dict(t.lm.config.get("eval", {}))
  else:
    try:
      setup, lm_params, states, hypers = trained_or_parts
    except (TypeError, ValueError):
      raise ValueError("spliced_grammaticality takes a train_sae.Trained or a tuple (setup, "
                       "lm_params, group_states, group_hypers)") from None
    lm_eval = {}
  mc = setup.model_config
  if max_new_tokens is None:
    max_new_tokens = lm_eval.get("max_new_tokens", generate_lib.MAX_NEW_TOKENS)
    max_new_tokens = min(int(max_new_tokens), mc.context - setup.grammar.prefix_len)
  temperature = lm_eval.get("temperature", 1.0) if temperature is None else temperature
  top_k = lm_eval.get("top_k", 0) if top_k is None else top_k
  if len(states) != len(setup.specs) or len(hypers) != len(setup.specs):
    raise ValueError(f"got {len(states)} group states and {len(hypers)} hypers for "
                     f"{len(setup.specs)} groups")
  return setup, lm_params, states, hypers, int(max_new_tokens), float(temperature), int(top_k)


def spliced_grammaticality(trained_or_parts, *, seed: int = 0, num_batches: int = 5,
                           batch_size: int = 128,
                           modes: Sequence[str] = ("corrected", "original"),
                           positions: Sequence[str] = ("all", "sentence"),
                           max_new_tokens: int | None = None, temperature: float | None = None,
                           top_k: int | None = None) -> dict[str, Any]:
  """Fraction of grammatical generations with each SAE spliced in, next to the clean model's.

  Every variant samples `num_batches × batch_size` sequences (batch i from
  `fold_in(fold_in(key(seed), 1001), i)`, the same keys for the clean model and every variant:
  common random numbers) with its SAE replacing the site during generation; the exact
  recogniser judges them. `positions='all'` splices at every position, the decorator prompt
  included; `'sentence'` only at the generated positions (after the 7-token decorator, i.e.
  the sentence tokens and what follows, as the `sentence` mask of training). For SAEs without
  input / recon normalisation both modes are the same function and are generated once.

  Generation runs variant by variant, but each (group, mode, positions) compiles once: the
  SAE params are arguments of one jitted generation loop, not closures.

  Args:
    trained_or_parts: a `train_sae.Trained`, or `(setup, lm_params, group_states, hypers)`.
    seed: the evaluation seed.
    num_batches, batch_size: samples per variant (the spec: 5 × 128).
    modes: splice modes (`corrected`, `original`).
    positions: `all` and/or `sentence`.
    max_new_tokens, temperature, top_k: generation settings; default the LM job's (`eval.*`
      of its config) or `generate`'s defaults, capped to the model context.

  Returns:
    `{'clean': {mean, std, per_batch, finished}, 'settings': {...}, 'variants': {id:
    {'<mode>/<positions>': {mean, std, per_batch, finished}}}}`; padding variants skipped.
  """
  check_positive_int("num_batches", num_batches)
  check_positive_int("batch_size", batch_size)
  modes, positions = tuple(modes), tuple(positions)
  check_options(modes, positions)
  setup, lm_params, states, hypers, max_new, temp, top_k = _gen_settings(
      trained_or_parts, max_new_tokens, temperature, top_k)
  if not temp > 0:
    raise ValueError(f"temperature must be > 0, got {temp}")
  g, mc = setup.grammar, setup.model_config
  key = jax.random.fold_in(jax.random.key(seed), GENERATION_STREAM)
  clean = generate_lib.grammaticality(lm_params, mc, g, key, num_batches=num_batches,
                                      batch_size=batch_size, max_new_tokens=max_new,
                                      temperature=temp, top_k=top_k)
  out = {"clean": {k: clean[k] for k in ("mean", "std", "per_batch", "finished")},
         "settings": {"seed": seed, "num_batches": num_batches, "batch_size": batch_size,
                      "max_new_tokens": max_new, "temperature": temp, "top_k": top_k},
         "variants": {}}
  keys = [jax.random.fold_in(key, i) for i in range(num_batches)]
  temperature_arr = jnp.float32(temp)
  for spec, gs, hyper in zip(setup.specs, states, hypers):
    normalised = spec.sae.input_norm or spec.sae.recon_norm
    for i, vid in enumerate(spec.ids):
      pick = lambda tree: jax.tree.map(lambda a: a[i], tree)  # pylint: disable=cell-var-from-loop
      p_i, s_i, h_i = pick(gs.params), pick(gs.sae_state), pick(hyper.hparams)
      res = {}
      for mode in modes:
        for pos in positions:
          same = f"corrected/{pos}" if mode == "original" else f"original/{pos}"
          if not normalised and same in res:
            res[f"{mode}/{pos}"] = res[same]
            continue
          st = _GenStatic(sae=spec.sae, mode=mode, positions=pos, site=setup.site,
                          model_config=mc, prefix_len=g.prefix_len, batch_size=batch_size,
                          max_new_tokens=max_new, top_k=top_k)
          fractions, finished = [], []
          for k in keys:
            tokens, done = _generate_spliced(lm_params, p_i, s_i, h_i, g, k, temperature_arr,
                                             st=st)
            fractions.append(float(_recognise(g, np.asarray(tokens)).mean()))
            finished.append(np.asarray(done))
          res[f"{mode}/{pos}"] = {"mean": float(np.mean(fractions)),
                                  "std": float(np.std(fractions)), "per_batch": fractions,
                                  "finished": float(np.concatenate(finished).mean())}
      out["variants"][vid] = res
  return out

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

Transcoders (a grid with `target_site` 'mlp_out.{l}', site 'mlp_in.{l}'): at every spliced
position MLP l's output is replaced by the transcoder applied to MLP l's input of the same
forward step (`transcoder_replace`: a pair of replacements, mlp_in.l handing its activation on
to mlp_out.l), with the same positions semantics; they have no input / recon norm, so their
modes coincide and are generated once.

How it runs (`group_generations`): one compiled call per group and (mode, positions) samples
every variant's `num_batches` batches; variants and batches are vmapped, or run one after
another (`lax.map`) where the grid's `variant_loop` says so (its 'auto' picks the map on CPU).
The decorator prompt is prefilled once per variant for `positions='all'` and once for the whole
grid for 'sentence' (the clean prompt), and shared by the batches; each batch stops as soon as
every row has emitted `<eos>`. The SAE params, the splice mode and the positions value are
traced arguments, so each group compiles once. Every group is dispatched before any is
collected, so later groups compile while earlier ones run.
The tokens equal those of `generate.generate` with the SAE as a replacement closure, batch by
batch with the same keys.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

from absl import logging
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.core import variant_axis
from jaxsae.evaluation import partial
from jaxsae.grid import grid_step
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import trained as trained_lib
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import model as model_lib

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
  site: str
  model_config: model_lib.ModelConfig
  batch_size: int
  max_new_tokens: int
  top_k: int
  variant_loop: str  # over variants and over batches: 'vmap' or 'map'
  target: str = ""  # a transcoder grid's target site ('mlp_out.{l}'; the site is 'mlp_in.{l}')


def transcoder_replace(in_site: str, out_site: str, fn) -> tuple[tuple[str, Any], ...]:
  """`model.apply` / `generate` replacement pairs that put `fn(h)` in place of the activation
  at `out_site`, h being the activation at `in_site` (an earlier site) of the SAME forward.

  A replacement function sees only its own site's activation, so the pair at `in_site` hands
  h on (unchanged) to the one at `out_site`, which the forward calls next, in the same trace.
  For a transcoder: `in_site` mlp_in.l, `out_site` mlp_out.l, `fn` the transcoder.
  """
  held = []

  def hold(h_BtD):
    held.append(h_BtD)
    return h_BtD

  def put(m_BtD):
    if not held:
      raise ValueError(f"the replacement at {out_site!r} ran without {in_site!r} before it "
                       "in the same forward; pass both pairs to one model call")
    h_BtD = held.pop()
    chex.assert_equal_shape((h_BtD, m_BtD))
    return fn(h_BtD)

  return ((in_site, hold), (out_site, put))


def _replacement(sae_params, sae_state, hparams, original, st: _GenStatic):
  """The SAE at the site, in splice mode 'original' where the traced bool `original` says so,
  else 'corrected' (one compilation for both; without input / recon norm they coincide).
  A transcoder (`st.target`) replaces its target with its output on that forward's site
  activation (its splice modes coincide: it has no input / recon norm)."""

  if st.target:
    transcode = lambda h_BtD: sae_lib.forward(sae_params, h_BtD, st.sae, hparams,
                                              state=sae_state)[0]
    return transcoder_replace(st.site, st.target, transcode)

  def splice(mode, x_BtD):
    return sae_lib.splice(sae_params, x_BtD, st.sae, hparams, mode, state=sae_state)[0]

  def replace(x_BtD):
    if not (st.sae.input_norm or st.sae.recon_norm):
      return splice("corrected", x_BtD)
    return jax.lax.cond(original, functools.partial(splice, "original"),
                        functools.partial(splice, "corrected"), x_BtD)

  return {st.site: replace}


@functools.partial(jax.jit, static_argnames=("st",))
def _clean_prefix(lm_params, grammar, *, st: _GenStatic) -> generate_lib.Prefix:
  return generate_lib.prefill(lm_params, st.model_config, grammar, batch_size=st.batch_size,
                              max_new_tokens=st.max_new_tokens)


@functools.partial(jax.jit, static_argnames=("st",))
def _decode_group(lm_params, sae_params, sae_state, hparams, clean_prefix, splice_prompt, original,
                  grammar, keys_G, temperature, *, st: _GenStatic):
  """Tokens `[N, G, B, T]` and finished `[N, G, B]`: every variant of a group (leading axis N of
  the SAE arrays) samples G batches (one per key) from one prefilled prompt: its own with the
  SAE spliced in where `splice_prompt`, else the shared `clean_prefix`. `splice_prompt` and
  `original` (the splice mode) are traced bools, so one compilation serves a group's every
  mode and positions value."""

  def one(p, s, h):
    replace = _replacement(p, s, h, original, st)
    prefix = jax.lax.cond(
        splice_prompt,
        lambda: generate_lib.prefill(lm_params, st.model_config, grammar,
                                     batch_size=st.batch_size, max_new_tokens=st.max_new_tokens,
                                     replace=replace),
        lambda: clean_prefix)

    def batch(key):
      gen = generate_lib.decode(lm_params, st.model_config, grammar, prefix, key,
                                max_new_tokens=st.max_new_tokens, temperature=temperature,
                                top_k=st.top_k, replace=replace)
      return gen.tokens, gen.finished

    return variant_axis.over_variants(batch, st.variant_loop)(keys_G)

  return variant_axis.over_variants(one, st.variant_loop)(sae_params, sae_state, hparams)


def group_generations(setup: grid_step.Setup, lm_params, sae: sae_lib.SAEConfig, params,
                      sae_state: sae_lib.SAEState, hparams: sae_lib.SAEHparams,
                      keys: jax.Array, *, mode: str, positions: str, batch_size: int = 128,
                      max_new_tokens: int = generate_lib.MAX_NEW_TOKENS,
                      temperature: float = 1.0, top_k: int = 0,
                      clean_prefix: generate_lib.Prefix | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Generations with each variant of a group spliced in, G batches per variant, in one call.

  Batch g of every variant equals `generate.generate(..., key=keys[g], replace={site: that
  variant's SAE})` token for token (for `positions='sentence'`, with the decorator prompt
  left clean; for a transcoder grid, `replace=transcoder_replace(site, target, transcoder)`). The prompt is prefilled once per variant (`all`), or once for every variant
  and group (`sentence`: the clean prefix, computed here unless passed); variants and batches
  run vmapped or one after another (`lax.map`) as the grid's `variant_loop` says, and each
  batch stops as soon as all its rows have emitted <eos>. One compilation per group (its
  SAE config and the sizes) for every mode and positions value.

  Args:
    setup: the grid's setup (model, site, grammar, variant_loop).
    lm_params: the frozen LM.
    sae: the group's SAE config.
    params, sae_state, hparams: its stacked SAE params / state / hparams (leading axis N: the
      variants to generate with).
    keys: typed PRNG keys `[G]`, one per batch.
    mode: splice mode (`sae.SPLICE_MODES`).
    positions: `all` (the SAE also replaces the prompt's activations) or `sentence`.
    batch_size, max_new_tokens, temperature, top_k: generation settings.
    clean_prefix: the clean model's prefilled prompt for `sentence` (from a previous call's
      `clean_prefix_for`), to share it across groups.

  Returns:
    `(tokens [N, G, B, 7 + max_new_tokens], finished [N, G, B])` as host arrays.
  """
  tokens, finished = dispatch_group(setup, lm_params, sae, params, sae_state, hparams, keys,
                                    mode=mode, positions=positions, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, clean_prefix=clean_prefix)
  return np.asarray(tokens), np.asarray(finished)


def dispatch_group(setup: grid_step.Setup, lm_params, sae: sae_lib.SAEConfig, params,
                   sae_state: sae_lib.SAEState, hparams: sae_lib.SAEHparams, keys: jax.Array, *,
                   mode: str, positions: str, batch_size: int = 128,
                   max_new_tokens: int = generate_lib.MAX_NEW_TOKENS, temperature: float = 1.0,
                   top_k: int = 0, clean_prefix: generate_lib.Prefix | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """`group_generations` without waiting: returns the device arrays as soon as the work is
  dispatched, so the next group compiles while this one runs."""
  check_options((mode,), (positions,))
  st = _GenStatic(sae=sae, site=setup.site, model_config=setup.model_config,
                  batch_size=int(batch_size), max_new_tokens=int(max_new_tokens),
                  top_k=int(top_k), variant_loop=getattr(setup, "variant_loop", "vmap"),
                  target=grid_step.target_site(setup))
  if clean_prefix is None:
    clean_prefix = clean_prefix_for(setup, lm_params, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens)
  return _decode_group(lm_params, params, sae_state, hparams, clean_prefix,
                       jnp.asarray(positions == "all"), jnp.asarray(mode == "original"),
                       setup.grammar, keys, jnp.float32(temperature), st=st)


def clean_prefix_for(setup: grid_step.Setup, lm_params, *, batch_size: int = 128,
                     max_new_tokens: int = generate_lib.MAX_NEW_TOKENS) -> generate_lib.Prefix:
  """The clean model's prefilled decorator (`generate.prefill`), shared by `sentence` runs."""
  st = _GenStatic(sae=None, site=setup.site, model_config=setup.model_config,
                  batch_size=int(batch_size), max_new_tokens=int(max_new_tokens), top_k=0,
                  variant_loop="vmap")
  return _clean_prefix(lm_params, setup.grammar, st=st)


def _gen_settings(trained_or_parts, max_new_tokens, temperature, top_k):
  """(setup, lm_params, group states, hypers, generation settings) from either input form."""
  if isinstance(trained_or_parts, trained_lib.TrainedGrid):
    t = trained_or_parts
    setup, lm_params, states, hypers = t.setup, t.lm.params, t.state.groups, t.hypers
    lm_eval = dict(t.lm.config.get("eval", {}))
  else:
    try:
      setup, lm_params, states, hypers = trained_or_parts
    except (TypeError, ValueError):
      raise ValueError("spliced_grammaticality takes a trained.TrainedGrid or a tuple (setup, "
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
                           top_k: int | None = None, store: partial.Store | None = None
                           ) -> dict[str, Any]:
  """Fraction of grammatical generations with each SAE spliced in, next to the clean model's.

  Every variant samples `num_batches × batch_size` sequences (batch i from
  `fold_in(fold_in(key(seed), 1001), i)`, the same keys for the clean model and every variant:
  common random numbers) with its SAE replacing the site during generation; the exact
  recogniser judges them. `positions='all'` splices at every position, the decorator prompt
  included; `'sentence'` only at the generated positions (after the 7-token decorator, i.e.
  the sentence tokens and what follows, as the `sentence` mask of training). For SAEs without
  input / recon normalisation both modes are the same function and are generated once.

  Each group runs all its variants and batches in one call and compiles once (the module
  docstring). `seconds` in the result: the clean model's generations (`clean`), the spliced
  ones (`generation`, compilation included) and the recogniser's (`recognition`).

  Args:
    trained_or_parts: a `trained.TrainedGrid`, or `(setup, lm_params, group_states, hypers)`.
    seed: the evaluation seed.
    num_batches, batch_size: samples per variant (the spec: 5 × 128).
    modes: splice modes (`corrected`, `original`).
    positions: `all` and/or `sentence`.
    max_new_tokens, temperature, top_k: generation settings; default the LM job's (`eval.*`
      of its config) or `generate`'s defaults, capped to the model context.
    store: a `partial.Store` (or None): each group's generations for each combination are
      saved as they are collected, and read from it instead of generated when found there.

  Returns:
    `{'clean': {mean, std, per_batch, finished}, 'settings': {...}, 'variants': {id:
    {'<mode>/<positions>': {mean, std, per_batch, finished}}}, 'seconds': {...}}`; padding
    variants skipped.
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
  t0 = time.perf_counter()
  clean = generate_lib.grammaticality(lm_params, mc, g, key, num_batches=num_batches,
                                      batch_size=batch_size, max_new_tokens=max_new,
                                      temperature=temp, top_k=top_k)
  out = {"clean": {k: clean[k] for k in ("mean", "std", "per_batch", "finished")},
         "settings": {"seed": seed, "num_batches": num_batches, "batch_size": batch_size,
                      "max_new_tokens": max_new, "temperature": temp, "top_k": top_k},
         "variants": {}}
  t_clean = time.perf_counter() - t0
  keys = jnp.stack([jax.random.fold_in(key, i) for i in range(num_batches)])
  settings = dict(batch_size=batch_size, max_new_tokens=max_new, temperature=temp, top_k=top_k)
  clean_prefix = clean_prefix_for(setup, lm_params, batch_size=batch_size, max_new_tokens=max_new)
  # Every group's work is dispatched first (each call returns once compiled), then collected:
  # a group compiles while the previous ones run.
  t1 = time.perf_counter()
  pending, shared, collected = [], [], []
  part_settings = dict(out["settings"], groups=len(setup.specs))

  def collect(block: bool) -> None:
    """Collects the dispatched parts in order, as far as they are finished (all of them when
    `block`), saving each to the store as it arrives."""
    while len(collected) < len(pending):
      g_idx, spec, combo, saved, arrays = pending[len(collected)]
      if not (block or saved is not None or all(a.is_ready() for a in jax.tree.leaves(arrays))):
        return
      tokens, done = saved if saved is not None else jax.device_get(arrays)
      if saved is None:
        if store:
          store.save_generations(g_idx, combo, part_settings, tokens, done)
        logging.info("spliced generations: group %s %s done (%d of %d, %.0f s)", spec.name,
                     combo, len(collected) + 1, len(pending), time.perf_counter() - t1)
      collected.append((spec, combo, (tokens, done)))

  for g_idx, (spec, gs, hyper) in enumerate(zip(setup.specs, states, hypers)):
    normalised = spec.sae.input_norm or spec.sae.recon_norm
    real = lambda tree: jax.tree.map(lambda a: a[:spec.size], tree)  # pylint: disable=cell-var-from-loop
    for mode in modes:
      for pos in positions:
        combo = f"{mode}/{pos}"
        twin = f"{'corrected' if mode == 'original' else 'original'}/{pos}"
        if not normalised and twin.split("/")[0] in modes[:modes.index(mode)]:
          shared.append((spec, combo, twin))  # the same function: generated once
          continue
        saved = store.load_generations(g_idx, combo, part_settings) if store else None
        arrays = None if saved is not None else dispatch_group(
            setup, lm_params, spec.sae, real(gs.params), real(gs.sae_state),
            real(hyper.hparams), keys, mode=mode, positions=pos, clean_prefix=clean_prefix,
            **settings)
        pending.append((g_idx, spec, combo, saved, arrays))
        collect(block=False)
  # The recogniser's eager ops would queue behind the groups still running: wait for all.
  collect(block=True)
  pending = collected
  t_gen = time.perf_counter() - t1
  for spec, combo, (tokens, done) in pending:
    ok = generate_lib.recognise(g, tokens)  # [N, G, B]
    for i, vid in enumerate(spec.ids):
      fractions = [float(f) for f in ok[i].mean(axis=1)]
      out["variants"].setdefault(vid, {})[combo] = {
          "mean": float(np.mean(fractions)), "std": float(np.std(fractions)),
          "per_batch": fractions, "finished": float(done[i].mean())}
  for spec, combo, twin in shared:
    for vid in spec.ids:
      out["variants"][vid][combo] = out["variants"][vid][twin]
  t_rec = time.perf_counter() - t1 - t_gen
  out["seconds"] = {"clean": t_clean, "generation": t_gen, "recognition": t_rec}
  return out

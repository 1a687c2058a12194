"""Export of trained SAEs in SAELens 6's on-disk format, plus our own bit-exact params.

Layout: one directory per SAE, `<out>/<variant_id>/`, holding

  cfg.json                  exactly what SAELens 6's `save_model` writes (`jaxsae.interop.saelens`).
  sae_weights.safetensors   float32, SAELens' names and layouts: W_enc [d_in, d_sae], b_enc
                            [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; threshold [d_sae]
                            ('jumprelu'); b_gate, r_mag, b_mag [d_sae] ('gated', no b_enc).
  jaxsae.json               our metadata: format_version, variant_id, language, site,
                            splice_mode, sae_config (every `SAEConfig` field), hparams
                            (`SAEHparams`), state (BatchTopK threshold and update count), saelens
                            (`jaxsae.interop.saelens.Form`: loadable or refused, and how) and extra (free
                            JSON; for trained grids the sweep values, group, loss, lr, step...).
  jaxsae_params.npz         our raw params (`jaxsae.grid.sae` names and layouts), bit-exact; what
                            `load_sae` reads to rebuild the variant (the tensors above are
                            derived, lossy).

SAEs of a kind SAELens can express load with `sae_lens.SAE.load_from_disk(<dir>)` and give the
codes and spliced output of `sae.splice` under the variant's splice mode; the others are written
so that SAELens refuses them (see `jaxsae.interop.saelens`). `saelens.numpy_forward` is the files'
executable definition (x [..., d_in] -> x_hat [..., d_in], codes [..., d_sae]):

  x_in   = x·√d/‖x‖                     normalize_activations 'constant_norm_rescale'
         = x/max(‖x‖, 1e-8)             'jaxsae_input' or 'jaxsae_input_recon'
         = x                            otherwise
  sae_in = x_in − b_dec                 if apply_b_dec_to_input, else x_in
  pre    = sae_in @ W_enc + b_enc
  codes  = relu(pre)                                   architecture 'standard'
         = relu of the k largest of pre, others 0      'topk' (top-level k)
         = relu(pre) · 1[pre > threshold]              'jumprelu'
         = 1[pre > 0]·relu(sae_in @ (W_enc·exp(r_mag)) + b_mag)  'gated', b_gate for b_enc
  x_hat  = codes @ W_dec + b_dec
  x_hat  = x_hat·‖x‖/√d                 'constant_norm_rescale'
         = x_hat/max(‖x_hat‖, 1e-8)     'jaxsae_recon' or 'jaxsae_input_recon'

'jaxsae_sparsemax' (Menon's prototype encoders; the kind is jaxsae.json's sae_config.activation;
apply_b_dec_to_input is false): x̃ = (x_in − b_pre)/max(‖x_in − b_pre‖, 1e-8), dots = x̃ @ W_enc
(columns of W_enc are the unit prototypes a_j), sq_j = ‖x̃‖² + ‖a_j‖² − 2·dots_j, pre = lam·dots
(no_kds) | dots − lam·sq (recon_dist) | −lam·sq (dist), codes = sparsemax(pre) (Euclidean
projection onto the simplex), x_hat as above.

How our parameters map onto these tensors (`jaxsae.grid.sae`: pre = (x_in − b_pre) @ w_enc + b_enc,
x_hat = codes @ dictionary + b_dec + b_pre):

- Pre-bias. SAELens subtracts its b_dec from the input when `apply_b_dec_to_input` is true and
  adds the same b_dec to the output. We set `apply_b_dec_to_input = pre_bias` and export
  `b_dec = b_dec_ours + b_pre` (absent biases count as zero). Subtracting that b_dec also takes
  b_dec_ours off the input, so when both biases exist it is added back through the encoder bias:
  `b_enc = b_enc_ours + b_dec_ours @ w_enc` (exact in real arithmetic; with pre_bias and no
  dec_bias, as in Menon's SAEs, b_dec = b_pre and b_enc = b_enc_ours exactly). Without pre_bias,
  b_dec = b_dec_ours and nothing is subtracted. Sparsemax encoders normalise x − b_pre, which no
  bias fold can express, so they carry b_pre as its own tensor (and `lam` []) instead.
- Decoder norm. W_dec is the dictionary the forward actually uses: under `decoder_norm =
  'forward'` each row already divided by its L2 norm (the fold), under 'project' / 'none' the raw
  rows. W_enc is unchanged, so the exported codes equal ours latent for latent.
- JumpReLU: threshold = exp(log_threshold). BatchTopK exports its *inference* rule, codes =
  relu(pre)·1[pre > thr] with the tracked scalar threshold thr (0 before any update): that is
  architecture 'jumprelu' with threshold = thr for every latent (what SAELens saves for its own
  BatchTopK SAEs); the training-time k sits in jaxsae.json's hparams.
- Normalisation: see `jaxsae.interop.saelens` (input normalisation under splice mode 'corrected' becomes
  'constant_norm_rescale' with rescaled tensors; recon normalisation is refused).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np

from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sweep as sweep_lib
from jaxsae.grid import trained as trained_lib
from jaxsae.interop import saelens as saelens_lib

FORMAT_VERSION = 2
CONFIG_FILE = saelens_lib.CONFIG_FILE
WEIGHTS_FILE = saelens_lib.WEIGHTS_FILE
META_FILE = "jaxsae.json"
PARAMS_FILE = "jaxsae_params.npz"
MANIFEST_FILE = "export.json"
_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


# ------------------------------------------------------------------------------------------------
# Effective tensors and cfg.json.


def effective_tensors(params: sae_lib.Params, config: sae_lib.SAEConfig,
                      state: sae_lib.SAEState | None = None) -> dict[str, np.ndarray]:
  """The folded float32 tensors of one variant in our scale (see the module docstring).

  Args:
    params: one variant's params (no leading variant axis).
    config: its architecture.
    state: BatchTopK's state (its threshold); default `sae.init_state` (threshold 0).

  Returns:
    name -> float32 array, the tensors of sae_weights.safetensors (module docstring).
  """
  d, f = config.d_in, config.width
  zeros = lambda n: np.zeros((n,), np.float32)
  raw = {k: np.asarray(v, np.float32) for k, v in params.items()}
  b_dec_ours = raw.get("b_dec", zeros(d))
  b_pre = raw.get("b_pre", zeros(d))
  out = {"W_dec": np.asarray(sae_lib.dictionary(params, config), np.float32)}
  if config.is_sparsemax:
    unit_a = sae_lib.l2_normalize(params["a"])
    out["W_enc"] = np.asarray(unit_a, np.float32).T
    out["b_enc"] = zeros(f)
    out["b_pre"] = b_pre
    out["lam"] = raw["lam"].reshape(())
    out["b_dec"] = b_dec_ours + b_pre
  else:
    out["W_enc"] = raw["w_enc"]
    b_enc = raw.get("b_enc", zeros(f))
    if config.pre_bias and config.dec_bias:
      b_enc = b_enc + b_dec_ours @ raw["w_enc"]  # input is x − (b_dec + b_pre); restore b_dec
    out["b_gate" if config.activation == "gated" else "b_enc"] = b_enc.astype(np.float32)
    if config.activation == "gated":
      out["r_mag"] = raw["r_mag"]
      b_mag = raw["b_mag"]
      if config.pre_bias and config.dec_bias:  # as b_enc, through the scaled magnitude weights
        b_mag = b_mag + (b_dec_ours @ raw["w_enc"]) * np.exp(raw["r_mag"])
      out["b_mag"] = b_mag.astype(np.float32)
    out["b_dec"] = b_dec_ours + b_pre if config.pre_bias else b_dec_ours
  if config.activation == "jumprelu":
    out["threshold"] = np.asarray(jnp.exp(params["log_threshold"]), np.float32)
  elif config.activation == "batchtopk":
    state = sae_lib.init_state(config) if state is None else state
    out["threshold"] = np.full((f,), np.float32(np.asarray(state.threshold)), np.float32)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


_INT_FIELDS = ("k", "count", "dead_tokens", "since_fired")  # of SAEHparams / SAEState


def _struct_json(struct) -> dict[str, Any]:
  """An `SAEHparams` / `SAEState` as JSON, its None fields (e.g. AuxK's when unused) left out.
  float32 -> Python float is exact and JSON round-trips doubles exactly, so this is bit-exact."""
  values = {f.name: getattr(struct, f.name) for f in dataclasses.fields(struct)}
  return {name: (np.asarray(v).tolist() if name in _INT_FIELDS
                 else float(np.asarray(v, np.float32)))
          for name, v in values.items() if v is not None}


def _struct_from_json(cls, d: Mapping[str, Any]):
  return cls(**{name: jnp.asarray(v, jnp.int32) if name in _INT_FIELDS
                else jnp.asarray(np.float32(v)) for name, v in d.items()})


def _hook_layer(site: str) -> int:
  tail = site.rsplit(".", 1)[-1]
  return int(tail) if tail.isdigit() else -1


def jaxsae_meta(config: sae_lib.SAEConfig, hparams: sae_lib.SAEHparams,
                state: sae_lib.SAEState | None = None, *, site: str, language: str,
                variant_id: str, splice_mode: str = "corrected",
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """jaxsae.json of one variant (what `load_sae` needs besides the params)."""
  state = sae_lib.init_state(config) if state is None else state
  return {
      "format_version": FORMAT_VERSION,
      "variant_id": variant_id,
      "language": language,
      "site": site,
      "splice_mode": splice_mode,
      "sae_config": sae_lib.config_json(config),
      "hparams": _struct_json(hparams),
      "state": _struct_json(state),
      "saelens": saelens_lib.form(config, splice_mode).to_json(),
      "extra": dict(extra or {}),
  }


# ------------------------------------------------------------------------------------------------
# Validation.


def _expected_shapes(config: sae_lib.SAEConfig) -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(lambda: sae_lib.init(jax.random.key(0), config))
  return {k: tuple(v.shape) for k, v in shapes.items()}


def _check_params(params: Mapping[str, Any], config: sae_lib.SAEConfig, where: str) -> None:
  expected = _expected_shapes(config)
  if not isinstance(params, Mapping) or set(params) != set(expected):
    got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"{where}: params have keys {got} but SAEConfig(activation="
                     f"{config.activation!r}, enc_bias={config.enc_bias}, dec_bias="
                     f"{config.dec_bias}, pre_bias={config.pre_bias}) needs {sorted(expected)}; "
                     "pass the params this config was trained with")
  for name, shape in expected.items():
    got = tuple(np.shape(params[name]))
    if got != shape:
      hint = (" (a leading variant axis? export one variant: jax.tree.map(lambda a: a[i], "
              "params))" if got[1:] == shape else "")
      raise ValueError(f"{where}: params[{name!r}] has shape {got}, expected {shape} for "
                       f"d_in={config.d_in}, width={config.width}{hint}")


def _check_hparams(hparams: Any, config: sae_lib.SAEConfig) -> None:
  if not isinstance(hparams, sae_lib.SAEHparams):
    raise ValueError(f"hparams must be a jaxsae.grid.sae.SAEHparams, got {type(hparams).__name__}; "
                     "build one with sae.default_hparams(config, ...)")
  shapes = {n: np.shape(getattr(hparams, n)) for n in
            ("k", "jumprelu_bandwidth", "jumprelu_init_threshold", "threshold_decay")}
  if any(s != () for s in shapes.values()):
    raise ValueError(f"hparams must hold one variant's scalars, got shapes {shapes}; index a "
                     "stacked grid with jax.tree.map(lambda a: a[i], hparams)")
  sae_lib.check_hparams(hparams, config)


def _check_variant_id(variant_id: Any) -> None:
  if not isinstance(variant_id, str) or not _ID_RE.match(variant_id) or variant_id in (".", ".."):
    raise ValueError(f"variant_id={variant_id!r} must be a non-empty directory name of letters, "
                     "digits, '_', '-', '.' (it names <out_dir>/<variant_id>/)")


# ------------------------------------------------------------------------------------------------
# Export and load.


def export_sae(out_dir: str, params: sae_lib.Params, sae_config: sae_lib.SAEConfig,
               hparams: sae_lib.SAEHparams, *, site: str, language: str, variant_id: str,
               extra: Mapping[str, Any] | None = None, state: sae_lib.SAEState | None = None,
               model_name: str | None = None, context_size: int | None = None,
               splice_mode: str = "corrected") -> str:
  """Writes one SAE as `<out_dir>/<variant_id>/` (the four files of the module docstring).

  Args:
    out_dir: parent directory (created if missing); an existing variant directory is overwritten.
    params: one variant's params (no leading variant axis).
    sae_config: its architecture.
    hparams: its scalar `SAEHparams`.
    site: the model site it reads (`jaxsae.lm.model` name; cfg.json holds its TransformerLens
      hook name).
    language: the grammar the LM was trained on.
    variant_id: the directory name (e.g. the sweep id 'v003').
    extra: JSON-serialisable metadata stored under cfg['jaxsae']['extra'].
    state: BatchTopK's `SAEState` (its inference threshold); default `sae.init_state`.
    model_name: SAELens `model_name` (default 'jaxsae-<language>').
    context_size: SAELens `context_size` (positions the SAE was trained on), if known.
    splice_mode: how the variant is spliced into the model (`sae.SPLICE_MODES`); the SAELens
      SAE reproduces `sae.splice` in this mode.

  Returns:
    The variant directory's path.

  Raises:
    ValueError: params that do not fit the config, stacked hparams, a bad id or non-JSON extra.
  """
  if not isinstance(sae_config, sae_lib.SAEConfig):
    raise ValueError(f"sae_config must be a jaxsae.grid.sae.SAEConfig, got "
                     f"{type(sae_config).__name__}")
  _check_variant_id(variant_id)
  for name, value in (("site", site), ("language", language)):
    if not isinstance(value, str) or not value:
      raise ValueError(f"{name}={value!r} must be a non-empty string")
  _check_params(params, sae_config, f"export_sae({variant_id!r})")
  _check_hparams(hparams, sae_config)
  how = saelens_lib.form(sae_config, splice_mode)
  saelens_lib.hook_name(site)  # a model site, before anything is written
  state = sae_lib.init_state(sae_config) if state is None else state
  if np.shape(state.threshold) != () or np.shape(state.count) != ():
    raise ValueError("state must be one variant's SAEState (scalar threshold and count); index "
                     "a stacked grid with jax.tree.map(lambda a: a[i], state)")
  meta = jaxsae_meta(sae_config, hparams, state, site=site, language=language,
                     variant_id=variant_id, splice_mode=splice_mode, extra=extra)
  try:
    json.dumps(meta, allow_nan=False)  # checked before anything is written
  except (TypeError, ValueError) as e:
    raise ValueError(f"extra must be JSON-serialisable (finite numbers, str, lists, dicts): "
                     f"{e}") from e
  cfg = saelens_lib.cfg(sae_config, int(np.asarray(hparams.k)), how, site=site,
                        model_name=model_name or f"jaxsae-{language}", context_size=context_size)
  weights = saelens_lib.tensors(effective_tensors(params, sae_config, state), sae_config, how)
  path = os.path.join(out_dir, variant_id)
  os.makedirs(path, exist_ok=True)
  raw = {k: np.asarray(v) for k, v in params.items()}
  np.savez(os.path.join(path, PARAMS_FILE), **raw)
  safetensors_np.save_file(weights, os.path.join(path, WEIGHTS_FILE))
  jsonio.write(os.path.join(path, CONFIG_FILE), cfg, indent=None)  # as SAELens: one line
  jsonio.write(os.path.join(path, META_FILE), meta, allow_nan=False)
  return path


def _read_json(path: str, name: str = CONFIG_FILE) -> dict[str, Any]:
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} not found: {path!r} is not an exported SAE directory "
                            "(write one with jaxsae.interop.export.export_sae or the export job)")
  with open(file) as f:
    return json.load(f)


def _read_npz(path: str, name: str) -> dict[str, np.ndarray]:
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} not found; the export in {path!r} is incomplete, export "
                            "it again")
  with np.load(file, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def load_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The tensors of sae_weights.safetensors and cfg.json, as NumPy arrays and a dict."""
  cfg = _read_json(path)
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} not found; the export in {path!r} is incomplete, export "
                            "it again")
  return safetensors_np.load_file(file), cfg


def load_sae(path: str) -> tuple[sae_lib.Params, sae_lib.SAEConfig, sae_lib.SAEHparams,
                                 dict[str, Any]]:
  """Reads an exported SAE back into our representation, bit-exact.

  Args:
    path: a variant directory written by `export_sae`.

  Returns:
    `(params, sae_config, hparams, meta)`: params as jax arrays with our names; meta holds
    `variant_id`, `language`, `site`, `splice_mode`, `state` (the `SAEState`), `saelens` (the
    format decision), `extra` and `cfg` (cfg.json).

  Raises:
    FileNotFoundError: not an export directory. ValueError: no usable jaxsae.json (not written
    by jaxsae, or a newer format) or params that do not fit it.
  """
  cfg = _read_json(path)
  if not os.path.isfile(os.path.join(path, META_FILE)):
    raise ValueError(f"{path!r}: no {META_FILE}, so it was not written by jaxsae.interop.export; read "
                     "its tensors with load_weights / saelens.numpy_forward instead")
  block = _read_json(path, META_FILE)
  if block.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path!r}: jaxsae format_version {block.get('format_version')!r}, this "
                     f"reader knows {FORMAT_VERSION}; update jaxsae or export again")
  config = sae_lib.SAEConfig(**block["sae_config"])
  raw = _read_npz(path, PARAMS_FILE)
  _check_params(raw, config, f"load_sae({path!r})")
  params = {k: jnp.asarray(v) for k, v in raw.items()}
  hparams = _struct_from_json(sae_lib.SAEHparams, block["hparams"])
  state = _struct_from_json(sae_lib.SAEState, block["state"])
  meta = {"variant_id": block["variant_id"], "language": block["language"],
          "site": block["site"], "splice_mode": block["splice_mode"], "state": state,
          "saelens": block["saelens"], "extra": block.get("extra", {}), "cfg": cfg}
  return params, config, hparams, meta


# ------------------------------------------------------------------------------------------------
# Trained grids and the job.


def _index_of(trained: trained_lib.TrainedGrid) -> dict[str, tuple[int, int]]:
  return {vid: (g, j) for g, spec in enumerate(trained.setup.specs)
          for j, vid in enumerate(spec.ids)}


def _check_ids(requested: Sequence[str], known: Sequence[str], where: str) -> None:
  unknown = [v for v in requested if v not in known]
  if unknown:
    listed = ", ".join(sorted(known)[:20]) + (" ..." if len(known) > 20 else "")
    raise ValueError(f"{where}: unknown variant id(s) {unknown}; the grid holds {listed} "
                     "(see variants.json), or use 'all'")


def export_trained(trained: trained_lib.TrainedGrid, out_dir: str,
                   variant_ids: Sequence[str] | None = None) -> list[str]:
  """Exports variants of a trained grid (`trained.load(workdir)`), one dir each.

  Args:
    trained: the grid.
    out_dir: parent directory of the variant directories.
    variant_ids: ids to export (default: every real variant; padding is never exported).

  Returns:
    The variant directories, in the order of `variant_ids` (sorted ids by default).

  Raises:
    ValueError: an unknown variant id, or a transcoder variant.
  """
  index = _index_of(trained)
  ids = sorted(index) if variant_ids is None else list(dict.fromkeys(variant_ids))
  _check_ids(ids, list(index), "export_trained")
  setup = trained.setup
  if any(setup.specs[index[vid][0]].target_site for vid in ids):
    raise ValueError("export_trained: transcoders (target_site) have no SAELens form here (one "
                     "hook in and out); export the grid's plain SAEs only")
  language = str(trained.config.get("language") or trained.lm.language)
  step = int(np.asarray(trained.state.step))
  host = {}  # group -> (params, hparams, sae_state, frozen, bad_step) on the host, real rows
  paths = []
  for vid in ids:
    g, j = index[vid]
    spec = setup.specs[g]
    if g not in host:
      gs = trained.state.groups[g]
      cut = lambda tree, n=spec.size: jax.tree.map(lambda a: np.asarray(a)[:n], tree)
      host[g] = (cut(gs.params), cut(trained.hypers[g].hparams), cut(gs.sae_state),
                 cut(gs.frozen), cut(gs.bad_step))
    params, hparams, sae_state, frozen, bad_step = host[g]
    row = lambda tree: jax.tree.map(lambda a: a[j], tree)
    values = {k: sweep_lib.to_json(v) for k, v in spec.values[j].items()}
    extra = {"group": spec.name, "values": values,
             "loss": dataclasses.asdict(spec.loss), "splice_mode": spec.splice_mode,
             "lr": float(spec.lr[j]), "seed": int(spec.seed[j]), "step": step,
             "frozen": bool(frozen[j]), "bad_step": int(bad_step[j]),
             "positions": setup.positions, "lm_step": int(trained.lm.step)}
    paths.append(export_sae(out_dir, row(params), spec.sae, row(hparams), site=setup.site,
                            language=language, variant_id=vid, extra=extra,
                            state=row(sae_state), context_size=setup.forward_len,
                            splice_mode=spec.splice_mode))
  return paths


def manifest(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
  """variant id -> its SAELens form (`saelens.Form` fields) and directory: export.json."""
  out = {}
  for path in paths:
    meta = _read_json(path, META_FILE)
    out[meta["variant_id"]] = {**meta["saelens"], "dir": os.path.abspath(path)}
  return out


def parse_variants(variants: str) -> list[str] | None:
  """'all' -> None; 'v000,v003' (or '+'-separated) -> ['v000', 'v003']."""
  if not isinstance(variants, str) or not variants.strip():
    raise ValueError(f"config.variants={variants!r}: give 'all' or comma-separated variant ids "
                     "such as 'v000,v003'")
  if variants.strip() == "all":
    return None
  return [v.strip() for v in re.split(r"[,+]", variants) if v.strip()]


def run(config, workdir: str) -> dict[str, Any]:
  """The `export` job: `<workdir>/export/<variant_id>/` per variant, export/export.json (per
  variant: loadable by SAELens or refused, and how it was mapped) and summary.json.

  Args:
    config: `experiments/configs/export.py` (sae_workdir, variants, step).
    workdir: where the export goes.

  Returns:
    The summary (source workdir, step, and variant id -> export directory).

  Raises:
    FileNotFoundError: sae_workdir is not a trained sae job workdir.
    ValueError: bad variants / step, or an id the grid does not hold (before anything loads).
    workdir.LockedError: another job is writing to `workdir`.
    workdir.InputMismatchError: `workdir` holds an export of another grid (or checkpoint).
  """
  sae_workdir = config.sae_workdir
  if not sae_workdir or not os.path.isfile(os.path.join(sae_workdir, "config.json")):
    raise FileNotFoundError(f"config.sae_workdir={sae_workdir!r} is not an sae job workdir (no "
                            "config.json); train a grid first (python -m experiments.main "
                            "--config=experiments/configs/sae_e2e.py --workdir=...) and point "
                            "sae_workdir at it")
  ids = parse_variants(config.variants)
  step = config.step
  if not isinstance(step, int) or step < 0:
    raise ValueError(f"config.step={step!r} must be an int >= 0 (0: the latest checkpoint)")
  variants_path = os.path.join(sae_workdir, "variants.json")
  if ids is not None and os.path.isfile(variants_path):
    with open(variants_path) as f:
      known = [v["id"] for v in json.load(f)["variants"]]
    _check_ids(ids, known, f"config.variants ({sae_workdir})")
  with workdir_lib.lock(workdir):
    trained = trained_lib.load(sae_workdir, step or None)
    identity = workdir_lib.check_grid(workdir, trained.identity, "export")
    export_dir = os.path.join(workdir, "export")
    workdir_lib.record_input(workdir, "grid", identity)
    paths = export_trained(trained, export_dir, ids)
    if config.lm:
      from jaxsae.interop import lm_export  # pylint: disable=g-import-not-at-top
      lm_export.export_lm(os.path.join(workdir, "lm"), trained.lm.params,
                          trained.lm.model_config, model_name=f"jaxsae-{trained.lm.language}")
      lm_export.export_dataset(os.path.join(workdir, "data"), trained.lm.config,
                               config.train_batches)
    saelens = manifest(paths)
    jsonio.write(os.path.join(export_dir, MANIFEST_FILE), saelens)
    summary = {"sae_workdir": os.path.abspath(sae_workdir), "step": int(trained.state.step),
               "export_dir": export_dir, "format_version": FORMAT_VERSION,
               "variants": {os.path.basename(p): p for p in paths},
               "saelens_loadable": sorted(v for v, m in saelens.items() if m["loadable"]),
               "saelens_refused": sorted(v for v, m in saelens.items() if not m["loadable"]),
               "lm_dir": os.path.join(workdir, "lm") if config.lm else None,
               "data_dir": os.path.join(workdir, "data") if config.lm else None}
    jsonio.write(os.path.join(workdir, "summary.json"), summary)
  return summary

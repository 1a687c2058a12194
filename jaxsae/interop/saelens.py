"""The SAELens 6 on-disk form of one SAE: `cfg.json` and `sae_weights.safetensors`.

The two files are what SAELens 6's own `SAE.save_model` writes (checked against sae-lens 6.54),
so `sae_lens.SAE.load_from_disk(<dir>)` loads an SAE with one call:

  cfg.json   `SAEConfig.to_dict()` of the SAELens class: d_in, d_sae, dtype, device,
             apply_b_dec_to_input, normalize_activations, reshape_activations ('none'),
             metadata, architecture, and for 'topk' also k and rescale_acts_by_decoder_norm
             (false). `metadata` holds sae_lens_version (so SAELens reads the file through its
             6.x path, not its pre-6.0 compatibility path), sae_lens_training_version (null:
             trained by jaxsae), model_name, model_class_name, hook_name (TransformerLens form,
             `hook_name`), hook_head_index, context_size, prepend_bos, seqpos_slice,
             exclude_special_tokens, model_from_pretrained_kwargs.
  sae_weights.safetensors   float32 W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
             b_dec [d_in], and `threshold` [d_sae] for 'jumprelu'; for 'gated' b_gate, r_mag,
             b_mag [d_sae] in place of b_enc.

What the SAELens SAE computes is the variant *as spliced into the model* under its splice mode
(`sae.splice(..., mode=splice_mode)`): the same codes, and `sae(x)` equal to the spliced
activation. For SAEs without input / recon normalisation that is `sae.forward` exactly. How each
kind maps (`form`):

- ReLU -> 'standard'; TopK -> 'topk' with the variant's k; JumpReLU -> 'jumprelu' with threshold
  exp(log_threshold); BatchTopK -> 'jumprelu' with its tracked inference threshold on every
  latent (what SAELens itself saves for its BatchTopK SAEs).
- Gated (Rajamanoharan et al. 2024a) -> 'gated', SAELens' `GatedSAE`: gate pre-activation
  sae_in @ W_enc + b_gate, magnitude sae_in @ (W_enc·exp(r_mag)) + b_mag, codes
  1[gate > 0]·relu(magnitude): our formula, with the shared W_enc = w_enc and r_mag as trained.
  The biases fold like b_enc (`jaxsae.interop.export`): b_gate is the folded b_enc, and with
  pre_bias and dec_bias b_mag = b_mag_ours + (b_dec_ours @ w_enc)·exp(r_mag), the shift going
  through the magnitude path's weights w_enc·exp(r_mag).
- Input normalisation under splice mode 'corrected' (x -> x/‖x‖ into the SAE, its output
  times ‖x‖): SAELens' 'constant_norm_rescale' (x·√d/‖x‖ in, output ·‖x‖/√d) with W_enc/√d,
  b_dec·√d, W_dec·√d, which gives the same pre-activations and the same spliced output (exact
  in real arithmetic; for 'gated' both paths, as they share W_enc, with b_gate, r_mag, b_mag
  unchanged). Under splice mode 'original' the model feeds raw x and takes the raw
  output, so the plain tensors with 'none' are exact.
- Not expressible in SAELens, so written to be refused loudly: sparsemax encoders (architecture
  'jaxsae_sparsemax', which SAELens' registry does not know) and recon normalisation
  (normalize_activations 'jaxsae_recon' / 'jaxsae_input_recon', which SAELens' config rejects).
  Their files hold the tensors of `sae.forward` (output in the SAE's space), with 'jaxsae_input'
  marking input normalisation of a sparsemax encoder and, for sparsemax, `b_pre` [d_in] and
  `lam` [] (see `numpy_forward`). Recon-normalised gated SAEs are refused so (as 'gated').
  AuxK and Matryoshka change only the training: their SAEs export as the plain TopK /
  BatchTopK / ReLU SAEs they are.

`load` reads an SAELens 6 directory (ours, or one SAELens trained: 'standard', 'topk' with or
without rescale_acts_by_decoder_norm, 'jumprelu', 'gated'; normalisation 'none' or
'constant_norm_rescale') back into our representation, exactly: `sae.splice` of the result
equals SAELens' `sae(x)` and its codes SAELens' `encode(x)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np

from jaxsae.grid import sae as sae_lib

SAELENS_VERSION = "6.54.12"  # the SAELens release whose save_model this format reproduces
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens' allowed normalize_activations values that we write, and our own (refused) ones.
NORMALIZATIONS = ("none", "constant_norm_rescale", "jaxsae_input", "jaxsae_recon",
                  "jaxsae_input_recon")
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "jaxsae_sparsemax")


@dataclasses.dataclass(frozen=True)
class Form:
  """How one SAE is written in the SAELens format.

  Attributes:
    loadable: whether SAELens 6 loads it (and then reproduces the spliced SAE).
    architecture: SAELens `architecture` (or 'jaxsae_sparsemax').
    normalize_activations: one of `NORMALIZATIONS`.
    note: one sentence on the mapping (or why SAELens cannot express the SAE).
  """

  loadable: bool
  architecture: str
  normalize_activations: str
  note: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def hook_name(site: str) -> str:
  """TransformerLens hook name of a model site: 'resid_post.0' -> 'blocks.0.hook_resid_post'.

  Raises:
    ValueError: a name that is not one of `jaxsae.lm.model.site_names`' forms, or `mlp_in.<l>`.
  """
  if site == "ln_final":
    return "unembed.hook_in"
  kind, _, layer = site.partition(".")
  if kind == "mlp_in":
    raise ValueError(f"site={site!r} has no TransformerLens hook: ln2.hook_normalized holds "
                     "ln_2's output before its scale, hook_mlp_in its input")
  if kind not in ("resid_pre", "resid_post", "attn_out", "mlp_out") or not layer.isdigit():
    raise ValueError(f"site={site!r} is not a model site (resid_pre.<l>, attn_out.<l>, "
                     "mlp_out.<l>, resid_post.<l>, ln_final)")
  return f"blocks.{int(layer)}.hook_{kind}"


def form(config: sae_lib.SAEConfig, splice_mode: str = "corrected") -> Form:
  """How the SAE of `config`, spliced under `splice_mode`, is written (module docstring)."""
  if splice_mode not in sae_lib.SPLICE_MODES:
    raise ValueError(f"splice_mode={splice_mode!r}: use one of {sae_lib.SPLICE_MODES}")
  arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
          "batchtopk": "jumprelu", "gated": "gated"}.get(config.activation,
                                                         "jaxsae_sparsemax")
  what = {"relu": "ReLU", "topk": "TopK", "jumprelu": "JumpReLU",
          "batchtopk": "BatchTopK (its inference threshold, as JumpReLU)",
          "gated": "Gated (b_gate, r_mag, b_mag)"}.get(config.activation, config.activation)
  if config.recon_norm:
    norm = "jaxsae_input_recon" if config.input_norm else "jaxsae_recon"
    return Form(False, arch, norm, "refused: SAELens has no normalisation of the "
                    "reconstruction to unit norm")
  if config.is_sparsemax:
    norm = "jaxsae_input" if config.input_norm else "none"
    return Form(False, arch, norm, "refused: SAELens has no sparsemax (prototype) encoder")
  if config.input_norm and splice_mode == "corrected":
    return Form(True, arch, "constant_norm_rescale",
                    f"{what}; input normalisation as constant_norm_rescale with W_enc/sqrt(d), "
                    "b_dec*sqrt(d), W_dec*sqrt(d)")
  if config.input_norm:
    return Form(True, arch, "none", f"{what}; splice mode 'original' feeds the raw "
                    "activation, so no normalisation")
  return Form(True, arch, "none", what)


def tensors(effective: Mapping[str, np.ndarray], config: sae_lib.SAEConfig,
            how: Form) -> dict[str, np.ndarray]:
  """The safetensors arrays: `effective` (jaxsae.interop.export's folded tensors) in SAELens' scale."""
  out = {k: np.ascontiguousarray(v, np.float32) for k, v in effective.items()}
  if how.normalize_activations == "constant_norm_rescale":
    root = np.float32(math.sqrt(config.d_in))
    out["W_enc"] = out["W_enc"] / root
    out["b_dec"] = out["b_dec"] * root
    out["W_dec"] = out["W_dec"] * root
  return out


def cfg(config: sae_lib.SAEConfig, k: int, how: Form, *, site: str, model_name: str,
        context_size: int | None) -> dict[str, Any]:
  """cfg.json: the SAELens 6 `SAEConfig.to_dict()` of the SAE, key for key."""
  metadata = {
      "sae_lens_version": SAELENS_VERSION,
      "sae_lens_training_version": None,
      "model_name": model_name,
      "model_class_name": "HookedTransformer",
      "hook_name": hook_name(site),
      "hook_head_index": None,
      "context_size": context_size,
      "prepend_bos": False,
      "seqpos_slice": [None],
      "exclude_special_tokens": False,
      "model_from_pretrained_kwargs": {},
  }
  out = {
      "d_in": config.d_in,
      "d_sae": config.width,
      "dtype": "float32",
      "device": "cpu",
      "apply_b_dec_to_input": bool(config.pre_bias and not config.is_sparsemax),
      "normalize_activations": how.normalize_activations,
      "reshape_activations": "none",
      "metadata": metadata,
  }
  if how.architecture == "topk":
    out.update(k=int(k), rescale_acts_by_decoder_norm=False)
  out["architecture"] = how.architecture
  return out


# ------------------------------------------------------------------------------------------------
# The files' reference forward, NumPy only.


_EPS = 1e-8  # as `sae._EPS`: norms are clipped below at 1e-8 before dividing


def _np_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(_EPS))


def _np_sparsemax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  z_sorted = -np.sort(-z, axis=-1)
  cumsum = np.cumsum(z_sorted, axis=-1)
  rank = np.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  support = np.sum(1 + rank * z_sorted > cumsum, axis=-1, keepdims=True)
  tau = (np.take_along_axis(cumsum, support - 1, axis=-1) - 1) / support
  return np.maximum(z - tau, 0)


def numpy_forward(tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any], x: np.ndarray, *,
                  return_codes: bool = False, sparsemax_kind: str | None = None
                  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """The exported files' forward in plain NumPy (their executable definition).

  Args:
    tensors: the arrays of sae_weights.safetensors (`load_weights(path)[0]`).
    cfg: the cfg.json dict (only its SAELens fields are read).
    x: activations `[..., d_in]`.
    return_codes: also return the latents.
    sparsemax_kind: for 'jaxsae_sparsemax', 'no_kds' | 'recon_dist' | 'dist' (jaxsae.json's
      sae_config.activation without its 'sparsemax_' prefix).

  Returns:
    x_hat `[..., d_in]` (`jaxsae.interop.export`'s module docstring), or `(x_hat, codes)`.
  """
  t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  x = np.asarray(x, np.float32)
  if x.shape[-1] != cfg["d_in"]:
    raise ValueError(f"x has {x.shape[-1]} features, the SAE reads d_in={cfg['d_in']}")
  norm, arch = cfg["normalize_activations"], cfg["architecture"]
  if norm not in NORMALIZATIONS or arch not in ARCHITECTURES:
    raise ValueError(f"unsupported normalize_activations={norm!r} / architecture={arch!r}; "
                     f"this reader knows {NORMALIZATIONS} / {ARCHITECTURES}")
  scale = np.sqrt(np.float32(cfg["d_in"])) / np.linalg.norm(x, axis=-1, keepdims=True)
  if norm == "constant_norm_rescale":
    x = x * scale
  elif norm in ("jaxsae_input", "jaxsae_input_recon"):
    x = _np_normalize(x)
  if arch == "jaxsae_sparsemax":
    xt = _np_normalize(x - t["b_pre"])
    dots = xt @ t["W_enc"]
    sq = (np.sum(xt * xt, axis=-1, keepdims=True) + np.sum(t["W_enc"] ** 2, axis=0)
          - 2 * dots)
    lam = t["lam"]
    if sparsemax_kind not in ("no_kds", "recon_dist", "dist"):
      raise ValueError(f"sparsemax_kind={sparsemax_kind!r}: give 'no_kds', 'recon_dist' or "
                       "'dist' (jaxsae.json's sae_config.activation) for a sparsemax encoder")
    pre = {"no_kds": lam * dots, "recon_dist": dots - lam * sq,
           "dist": -lam * sq}[sparsemax_kind]
    codes = _np_sparsemax(pre + t["b_enc"])
  else:
    sae_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ t["W_enc"] + t["b_gate" if arch == "gated" else "b_enc"]
    codes = np.maximum(pre, 0)
    if arch == "gated":
      mag = sae_in @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"]
      codes = (pre > 0) * np.maximum(mag, 0)
    elif arch == "topk":
      drop = np.argsort(-pre, axis=-1, kind="stable")[..., int(cfg["k"]):]
      np.put_along_axis(codes, drop, 0, axis=-1)
    elif arch == "jumprelu":
      codes = codes * (pre > t["threshold"])
  x_hat = codes @ t["W_dec"] + t["b_dec"]
  if norm == "constant_norm_rescale":
    x_hat = x_hat / scale
  elif norm in ("jaxsae_recon", "jaxsae_input_recon"):
    x_hat = _np_normalize(x_hat)
  return (x_hat, codes) if return_codes else x_hat


# ------------------------------------------------------------------------------------------------
# Reading SAELens directories.


@dataclasses.dataclass(frozen=True)
class Imported:
  """An SAELens SAE in our representation (`load`).

  Attributes:
    params, sae_config, hparams: one variant, for `sae.splice` / `sae.forward`.
    splice_mode: the mode under which `sae.splice` equals SAELens' forward.
    site: our model site of its hook (None when the hook is not one of ours).
    cfg: the cfg.json dict.
  """

  params: sae_lib.Params
  sae_config: sae_lib.SAEConfig
  hparams: sae_lib.SAEHparams
  splice_mode: str
  site: str | None
  cfg: dict[str, Any]


def site_of(hook: str | None) -> str | None:
  """Inverse of `hook_name` (None for hooks that are not one of our sites)."""
  if hook == "unembed.hook_in":
    return "ln_final"
  parts = (hook or "").split(".")
  if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in (
      "hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
    return f"{parts[2][len('hook_'):]}.{int(parts[1])}"
  return None


def load(path: str) -> Imported:
  """Reads `<path>/cfg.json` + `sae_weights.safetensors` (SAELens 6) as one of our SAEs.

  Raises:
    FileNotFoundError: missing files. ValueError: an architecture, normalisation or setting
    with no exact counterpart here (the message names it).
  """
  files = [os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)]
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file} not found: {path!r} is not an SAELens SAE directory "
                              f"({CONFIG_FILE} + {WEIGHTS_FILE})")
  with open(files[0]) as f:
    cfg = json.load(f)
  t = {k: np.asarray(v, np.float32) for k, v in safetensors_np.load_file(files[1]).items()}
  arch, norm = cfg.get("architecture"), cfg.get("normalize_activations", "none")
  if arch not in ("standard", "topk", "jumprelu", "gated"):
    raise ValueError(f"{path!r}: architecture={arch!r} has no exact jaxsae counterpart; "
                     "supported: standard, topk, jumprelu, gated")
  if norm not in ("none", "constant_norm_rescale"):
    raise ValueError(f"{path!r}: normalize_activations={norm!r} is not supported; fold it into "
                     "the weights first (SAELens: sae.fold_activation_norm_scaling_factor) or "
                     "use 'none' / 'constant_norm_rescale'")
  if cfg.get("reshape_activations", "none") != "none":
    raise ValueError(f"{path!r}: reshape_activations={cfg['reshape_activations']!r} (hook_z "
                     "SAEs) is not supported")
  d, f = int(cfg["d_in"]), int(cfg["d_sae"])
  names = ("W_enc", "b_gate" if arch == "gated" else "b_enc", "W_dec", "b_dec") + (
      ("r_mag", "b_mag") if arch == "gated" else ("threshold",) if arch == "jumprelu" else ())
  missing = [name for name in names if name not in t]
  if missing:
    raise ValueError(f"{path!r}: {WEIGHTS_FILE} lacks {missing} (architecture={arch!r} needs "
                     f"{list(names)}); the weights do not belong to this cfg.json")
  w_enc, b_enc, w_dec, b_dec = (t[name] for name in names[:4])
  if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
    # SAELens: pre·‖W_dec_j‖, then codes @ (W_dec_j / ‖W_dec_j‖): fold the norms.
    norms = np.linalg.norm(w_dec, axis=-1)
    w_enc, b_enc, w_dec = w_enc * norms[None], b_enc * norms, w_dec / norms[:, None]
  if norm == "constant_norm_rescale":  # x·√d/‖x‖ in, ·‖x‖/√d out: our input_norm, rescaled
    root = np.float32(math.sqrt(d))
    w_enc, b_dec, w_dec = w_enc * root, b_dec / root, w_dec / root
  pre_bias = bool(cfg.get("apply_b_dec_to_input", True))
  k = int(cfg["k"]) if arch == "topk" else None
  config = sae_lib.SAEConfig(
      d_in=d, width=f, activation={"standard": "relu"}.get(arch, arch), k_max=k,
      enc_bias=True, dec_bias=not pre_bias, pre_bias=pre_bias, decoder_norm="none",
      input_norm=norm == "constant_norm_rescale", init="menon")
  params = {"w_enc": w_enc, "b_enc": b_enc, "w_dec": w_dec,
            ("b_pre" if pre_bias else "b_dec"): b_dec}
  if arch == "gated":  # b_gate is our gate path's b_enc; both paths share W_enc, as ours
    params.update(r_mag=t["r_mag"], b_mag=t["b_mag"])
  if arch == "jumprelu":
    if np.any(t["threshold"] < 0):
      raise ValueError(f"{path!r}: negative JumpReLU thresholds have no exact counterpart "
                       "(ours keeps z·1[z > θ], SAELens relu(z)·1[z > θ])")
    with np.errstate(divide="ignore"):
      params["log_threshold"] = np.log(t["threshold"])  # θ = 0: log 0 = -inf, exp -> 0
  expected = jax.eval_shape(lambda: sae_lib.init(jax.random.key(0), config))
  for name, shape in expected.items():
    if np.shape(params[name]) != shape.shape:
      raise ValueError(f"{path!r}: {name} has shape {np.shape(params[name])}, expected "
                       f"{shape.shape} for d_in={d}, d_sae={f}")
  params = {name: jnp.asarray(v, jnp.float32) for name, v in params.items()}
  hparams = sae_lib.default_hparams(config, **({"k": k} if k else {}))
  hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
  return Imported(params=params, sae_config=config, hparams=hparams, splice_mode="corrected",
                  site=site_of(hook), cfg=cfg)

"""Export of a trained LM for TransformerLens, and of its language's token streams as a dataset.

The LM (`export_lm`, directory `<out>/`):

  config.json        keyword arguments of `transformer_lens.HookedTransformerConfig`.
  model.safetensors  float32 parameters in `HookedTransformer`'s state-dict names.

Loading takes three calls and no network (TransformerLens ≥ 2; checked with 3.9):

    cfg = transformer_lens.HookedTransformerConfig(**json.load(open(f"{out}/config.json")))
    model = transformer_lens.HookedTransformer(cfg)
    model.load_and_process_state_dict(safetensors.torch.load_file(f"{out}/model.safetensors"),
        fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False)

Why this form rather than a Hugging Face GPT-2 checkpoint: TransformerLens converts HF weights
only for architectures it lists by name and then *processes* them by default (folds LayerNorm,
centres weights), which changes the activations at its hooks; GPT-2's HF config also means the
tanh GELU. A `HookedTransformerConfig` states our architecture exactly (exact erf GELU
'gelu', LayerNorm eps, learned positions, `n_ctx` = our context) and the state dict loads as is,
so every hook holds our activation. `load_and_process_state_dict` with processing off fills in
the attention mask buffers; plain `load_state_dict(..., strict=False)` works too.

The mapping (ours -> TransformerLens): wte -> embed.W_E and unembed.W_U = wteᵀ (tied);
wpe -> pos_embed.W_pos; ln_1 / ln_2 / ln_f scale -> ln1.w / ln2.w / ln_final.w with zero biases
(our LayerNorms have none); c_attn kernel [D, 3D], columns (q, k, v) then heads -> W_Q, W_K,
W_V [n_heads, D, d_head]; c_proj kernel [D, D] -> W_O [n_heads, d_head, D]; MLP c_fc / c_proj
-> W_in / W_out; every other bias zero. Sites -> hooks: `jaxsae.interop.saelens.hook_name`
(resid_pre.l -> blocks.l.hook_resid_pre, attn_out.l -> blocks.l.hook_attn_out, mlp_out.l ->
blocks.l.hook_mlp_out, resid_post.l -> blocks.l.hook_resid_post, mlp_in.l none, ln_final ->
unembed.hook_in: the final LayerNorm's output after its scale, which TransformerLens'
`ln_final.hook_normalized` is not, as it comes before the scale).

The dataset (`export_dataset`, directory `<out>/`): the LM run's own streams, `train` = its
first `train_batches` training batches (`lm_step.training_batch`) and `heldout` = its held-out
evaluation batches (`lm_step.heldout_key`), with every per-token ground-truth label of
`jaxsae.grammars.labels`:

  tokens.npz       per split s: `s/tokens` int32 [N, T], `s/sentence_mask` bool [N, T],
                   `s/label/<name>` int32 [N, T] (-1 where undefined).
  tokens.parquet   (when pyarrow is installed) one row per sequence: `split` (string),
                   `index` (int64, row within the split), `tokens` list<int32>,
                   `sentence_mask` list<bool>, `label_<name>` list<int32>.
  dataset.json     the schema: language, vocab (token strings by id), pad / eos ids,
                   decorator length, labels (kind, classes, description), splits (rows, how
                   drawn), the files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import numpy as safetensors_np

from jaxsae import grammars
from jaxsae.core import jsonio
from jaxsae.interop import saelens as saelens_lib
from jaxsae.lm import lm_step
from jaxsae.lm import model as model_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DATA_NPZ = "tokens.npz"
DATA_PARQUET = "tokens.parquet"
DATA_SCHEMA = "dataset.json"


def hook_names(config: model_lib.ModelConfig) -> dict[str, str]:
  """Our site name -> TransformerLens hook name, for every site of the model but `mlp_in.{l}`
  (TransformerLens has no hook for ln2's scaled output)."""
  return {site: saelens_lib.hook_name(site) for site in model_lib.site_names(config)
          if not site.startswith("mlp_in.")}


def tl_config(config: model_lib.ModelConfig, *, model_name: str) -> dict[str, Any]:
  """`HookedTransformerConfig` keyword arguments for the architecture of `config`."""
  return {
      "model_name": model_name,
      "n_layers": config.n_layers,
      "d_model": config.d_model,
      "n_ctx": config.context,
      "d_head": config.head_dim,
      "n_heads": config.n_heads,
      "d_mlp": config.d_mlp,
      "d_vocab": config.vocab_size,
      "d_vocab_out": config.vocab_size,
      "act_fn": "gelu",  # torch's exact (erf) GELU, as `jax.nn.gelu(approximate=False)`
      "normalization_type": "LN",
      "eps": config.ln_eps,
      "positional_embedding_type": "standard",
      "attn_only": False,
      "default_prepend_bos": False,  # sequences start with the grammar's decorator, no BOS
      "tokenizer_name": None,
      "original_architecture": "jaxsae",
  }


def tl_state_dict(params: model_lib.Params, config: model_lib.ModelConfig
                  ) -> dict[str, np.ndarray]:
  """Our params as a `HookedTransformer` state dict (float32 NumPy, biases zero)."""
  d, n, h, m, v = (config.d_model, config.n_heads, config.head_dim, config.d_mlp,
                   config.vocab_size)
  p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  zeros = lambda *shape: np.zeros(shape, np.float32)
  wte = p["wte"]
  out = {"embed.W_E": wte, "pos_embed.W_pos": p["wpe"], "unembed.W_U": wte.T,
         "unembed.b_U": zeros(v), "ln_final.w": p["ln_f"]["scale"], "ln_final.b": zeros(d)}
  for l in range(config.n_layers):
    blk, pre = p[f"block_{l}"], f"blocks.{l}."
    qkv_DGNH = blk["attn"]["c_attn"]["kernel"].reshape(d, 3, n, h)
    for g, name in enumerate("QKV"):
      out[pre + f"attn.W_{name}"] = qkv_DGNH[:, g].transpose(1, 0, 2)  # [n, D, h]
      out[pre + f"attn.b_{name}"] = zeros(n, h)
    out[pre + "attn.W_O"] = blk["attn"]["c_proj"]["kernel"].reshape(n, h, d)
    out[pre + "attn.b_O"] = zeros(d)
    out[pre + "mlp.W_in"] = blk["mlp"]["c_fc"]["kernel"]
    out[pre + "mlp.b_in"] = zeros(m)
    out[pre + "mlp.W_out"] = blk["mlp"]["c_proj"]["kernel"]
    out[pre + "mlp.b_out"] = zeros(d)
    for ours, theirs in (("ln_1", "ln1"), ("ln_2", "ln2")):
      out[pre + f"{theirs}.w"] = blk[ours]["scale"]
      out[pre + f"{theirs}.b"] = zeros(d)
  return {k: np.ascontiguousarray(a, np.float32) for k, a in out.items()}


def export_lm(out_dir: str, params: model_lib.Params, config: model_lib.ModelConfig, *,
              model_name: str) -> str:
  """Writes config.json and model.safetensors (module docstring) to `out_dir`; returns it."""
  if not isinstance(config, model_lib.ModelConfig):
    raise ValueError(f"config must be a jaxsae.lm.model.ModelConfig, got {type(config).__name__}")
  weights = tl_state_dict(params, config)  # shape errors surface before anything is written
  os.makedirs(out_dir, exist_ok=True)
  safetensors_np.save_file(weights, os.path.join(out_dir, WEIGHTS_FILE))
  jsonio.write(os.path.join(out_dir, CONFIG_FILE), tl_config(config, model_name=model_name))
  return out_dir


# ------------------------------------------------------------------------------------------------
# The dataset.


def _with_labels(grammar, tokens_BT: np.ndarray, mask_BT: np.ndarray) -> dict[str, np.ndarray]:
  labels = grammars.labels(grammar, tokens_BT)
  return {"tokens": tokens_BT.astype(np.int32), "sentence_mask": mask_BT.astype(bool),
          **{f"label/{k}": np.asarray(v, np.int32) for k, v in sorted(labels.items())}}


def dataset_splits(lm_config: Mapping[str, Any], train_batches: int
                   ) -> dict[str, dict[str, np.ndarray]]:
  """split -> name -> array: the LM run's first training batches and its held-out set.

  Args:
    lm_config: the LM job's config (ConfigDict or its dict).
    train_batches: how many training batches (of the run's batch_size) to include (>= 1).
  """
  if not isinstance(train_batches, int) or train_batches < 1:
    raise ValueError(f"train_batches={train_batches!r} must be an int >= 1")
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(lm_config))
  grammar = grammars.get(c.language)
  train = [lm_step.training_batch(c, step) for step in range(train_batches)]
  held = lm_step.make_eval_set(c, lm_step.heldout_key(c)).tokens_NBT
  held_BT = held.reshape(-1, held.shape[-1])
  n_BT1 = np.asarray(grammars.layout(grammar, held_BT).sentence_len)[:, None]
  pos_1T = np.arange(held_BT.shape[1])[None, :] - grammar.prefix_len
  held_mask = (pos_1T >= 0) & (pos_1T < n_BT1)  # the sampler's sentence_mask
  return {
      "train": _with_labels(grammar, np.concatenate([np.asarray(b.tokens) for b in train]),
                            np.concatenate([np.asarray(b.sentence_mask) for b in train])),
      "heldout": _with_labels(grammar, held_BT, held_mask),
  }


def export_dataset(out_dir: str, lm_config: Mapping[str, Any], train_batches: int = 1
                   ) -> dict[str, Any]:
  """Writes tokens.npz, tokens.parquet (if pyarrow is installed) and dataset.json.

  Returns:
    The schema written to dataset.json.
  """
  splits = dataset_splits(lm_config, train_batches)
  grammar = grammars.get(lm_config["language"])
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, DATA_NPZ),
           **{f"{s}/{k}": v for s, arrays in splits.items() for k, v in arrays.items()})
  files = [DATA_NPZ]
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top
    from pyarrow import parquet  # pylint: disable=g-import-not-at-top
  except ImportError:
    pyarrow = None
  if pyarrow is not None:
    columns: dict[str, list[Any]] = {}
    for s, arrays in splits.items():
      n = arrays["tokens"].shape[0]
      columns.setdefault("split", []).extend([s] * n)
      columns.setdefault("index", []).extend(range(n))
      for k, v in arrays.items():
        columns.setdefault(k.replace("/", "_"), []).extend(v.tolist())
    types = {"split": pyarrow.string(), "index": pyarrow.int64(),
             "sentence_mask": pyarrow.list_(pyarrow.bool_())}
    table = pyarrow.table({k: pyarrow.array(v, types.get(k, pyarrow.list_(pyarrow.int32())))
                           for k, v in columns.items()})
    parquet.write_table(table, os.path.join(out_dir, DATA_PARQUET))
    files.append(DATA_PARQUET)
  info = grammars.label_info(grammar)
  schema = {
      "language": grammar.name,
      "vocab": list(grammar.vocab),
      "pad_id": grammar.pad_id,
      "eos_id": grammar.eos_id,
      "decorator_len": grammar.prefix_len,
      "labels": {k: {"kind": v.kind, "classes": list(v.classes), "description": v.description}
                 for k, v in sorted(info.items())},
      "undefined_label": -1,
      "splits": {
          "train": {"rows": int(splits["train"]["tokens"].shape[0]),
                    "drawn": f"the LM run's training batches 0..{train_batches - 1} "
                             "(lm_step.training_batch)"},
          "heldout": {"rows": int(splits["heldout"]["tokens"].shape[0]),
                      "drawn": "the LM run's held-out evaluation set (lm_step.heldout_key)"},
      },
      "files": files,
  }
  jsonio.write(os.path.join(out_dir, DATA_SCHEMA), schema)
  return schema

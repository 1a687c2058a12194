"""Import of SAELens directories as a grid: export -> import -> evaluate gives the metrics of
the original grid, and bad input is refused before anything is written."""

import json
import math
import os

import pytest

import fakes
from jaxsae.evaluation import evaluate
from jaxsae.grid import train_sae
from jaxsae.grid import trained as trained_lib
from jaxsae.interop import export as export_lib
from jaxsae.interop import sae_import


def _placeholder_config(lm_dir):
  return fakes.smoke_sae_config(lm_dir, [{"set": {"loss": "local"}}])


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
  root = tmp_path_factory.mktemp("import")
  lm_dir = fakes.write_smoke_lm(root / "lm")
  c = fakes.smoke_sae_config(
      lm_dir,
      [{"set": {"loss": "local", "expansion": 2, "sparsity_coeff": 1.0}},
       {"set": {"loss": "local", "activation": "topk", "k": 3, "expansion": 2,
                "pre_bias": True}},
       {"set": {"loss": "local", "activation": "jumprelu", "expansion": 2,
                "sparsity_coeff": 0.1, "jumprelu_init_threshold": 0.05}},
       {"set": {"loss": "local", "expansion": 2, "input_norm": True, "pre_bias": True,
                "sparsity_coeff": 1.0}},
       {"set": {"loss": "local", "activation": "gated", "expansion": 2, "pre_bias": True,
                "sparsity_coeff": 1.0}}],
      steps=2, log_every=2, checkpoint_every=2)
  train_sae.run(c, str(root / "sae"))
  original = trained_lib.load(str(root / "sae"))
  dirs = export_lib.export_trained(original, str(root / "export"))
  sources = sae_import.import_grid(dirs, _placeholder_config(lm_dir), str(root / "imported"))
  return original, trained_lib.load(str(root / "imported")), dirs, sources, root


def test_import_maps_ids_to_sources(grids):
  original, imported, dirs, sources, root = grids
  assert sources == {f"v{i:03d}": os.path.abspath(d) for i, d in enumerate(dirs)}
  with open(root / "imported" / "imported.json") as f:
    assert json.load(f) == sources
  assert imported.setup.site == original.setup.site
  ids = lambda t: sorted(v for s in t.setup.specs for v in s.ids)
  assert ids(imported) == ids(original) == [os.path.basename(d) for d in dirs]


def test_round_trip_evaluates_to_the_same_metrics(grids):
  original, imported, _, _, _ = grids
  kw = dict(num_batches=1, batch_size=8, grammaticality_batches=1,
            grammaticality_batch_size=8)
  a = evaluate.evaluate_trained(original, **kw)["variants"]
  b = evaluate.evaluate_trained(imported, **kw)["variants"]
  assert sorted(a) == sorted(b)
  compared = 0
  for vid in a:
    for name, value in a[vid].items():
      if isinstance(value, float) and not isinstance(value, bool):
        other = b[vid][name]
        assert isinstance(other, float), (vid, name, value, other)
        assert math.isclose(value, other, rel_tol=1e-4, abs_tol=1e-5), (vid, name, value, other)
        compared += 1
  assert compared > 20 * len(a)


def test_bad_input_is_refused(grids, tmp_path):
  _, _, dirs, _, root = grids
  lm_dir = str(root / "lm")
  with pytest.raises(ValueError, match="sae_dirs is empty"):
    sae_import.import_grid([], _placeholder_config(lm_dir), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="already holds checkpoints"):
    sae_import.import_grid(dirs, _placeholder_config(lm_dir), str(root / "imported"))
  other = tmp_path / "other"
  os.makedirs(other)
  with open(os.path.join(dirs[0], "cfg.json")) as f:
    cfg = json.load(f)
  cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_pre"
  with open(other / "cfg.json", "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(dirs[0], "sae_weights.safetensors"), "rb") as src, open(
      other / "sae_weights.safetensors", "wb") as dst:
    dst.write(src.read())
  with pytest.raises(ValueError, match="import SAEs of one residual-stream hook"):
    sae_import.import_grid([dirs[0], str(other)], _placeholder_config(lm_dir),
                           str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")

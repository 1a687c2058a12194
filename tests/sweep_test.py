"""Tests for sweep expansion, grouping and stacking."""

import json

import numpy as np
import pytest

from jaxsae.grid import sweep

REG = [
    sweep.Field("activation", "relu", static=True),
    sweep.Field("expansion", 1, static=True,
                check=lambda v: None if v in (1, 2, 4, 8) else "expansion must be 1, 2, 4 or 8"),
    sweep.Field("k", 0, static=False, dtype=np.int32),
    sweep.Field("sparsity_coeff", 0.0, static=False,
                check=lambda v: None if v >= 0 else "must be >= 0"),
    sweep.Field("seed", 0, static=False, dtype=np.int32),
    sweep.Field("lr", 1e-3, static=False),
]


def test_product_zip_and_set():
  blocks = [
      {"product": {"expansion": [1, 2], "sparsity_coeff": [0.1, 1.0, 10.0]}},
      {"product": {"expansion": [4]}, "zip": {"seed": [0, 1], "lr": [1e-4, 3e-4]},
       "set": {"activation": "topk", "k": 8}},
  ]
  vs = sweep.expand(blocks, REG)
  assert len(vs) == 2 * 3 + 2
  assert [v.id for v in vs] == [f"v{i:03d}" for i in range(8)]
  assert vs[0].values == {"activation": "relu", "expansion": 1, "k": 0, "sparsity_coeff": 0.1,
                          "seed": 0, "lr": 1e-3}
  assert vs[7].values["seed"] == 1 and vs[7].values["lr"] == 3e-4 and vs[7].values["k"] == 8
  groups = sweep.group(vs, REG)
  assert [g.size for g in groups] == [3, 3, 2]
  assert groups[0].static == {"activation": "relu", "expansion": 1}
  np.testing.assert_allclose(groups[1].dynamic["sparsity_coeff"], [0.1, 1.0, 10.0])
  assert groups[2].dynamic["seed"].dtype == np.int32
  # Every variant appears in exactly one group, in sweep order within it.
  ids = [i for g in groups for i in g.ids]
  assert sorted(ids) == [v.id for v in vs]


def test_derive_hook_sets_group_statics():
  vs = sweep.expand([{"product": {"k": [8, 32, 16]}, "set": {"activation": "topk"}}], REG)
  groups = sweep.group(vs, REG, derive=lambda s, m: {**s, "k_max": max(v.values["k"] for v in m)})
  assert len(groups) == 1 and groups[0].static["k_max"] == 32
  np.testing.assert_array_equal(groups[0].dynamic["k"], [8, 32, 16])


@pytest.mark.parametrize("blocks, fragment", [
    ([], "the sweep is empty"),
    ([{"product": {"width": [1]}}], "unknown field 'width'"),
    ([{"product": {"expansion": []}}], "axis 'expansion' is empty"),
    ([{"product": {"expansion": 2}}], "must be a list"),
    ([{"zip": {"seed": [0, 1], "lr": [1e-3]}}], "different lengths"),
    ([{"product": {"expansion": [3]}}], "expansion must be 1, 2, 4 or 8"),
    ([{"product": {"sparsity_coeff": [-1.0]}}], "sparsity_coeff=-1.0: must be >= 0"),
    ([{"product": {"seed": [0]}}, {"set": {"seed": 0}}], "repeats variant 0"),
    ([{"product": {"seed": [0]}, "set": {"seed": 1}}], "given more than once"),
    ([{"grid": {}}], "may only have"),
])
def test_bad_sweeps(blocks, fragment):
  with pytest.raises(sweep.SweepError) as err:
    sweep.expand(blocks, REG)
  assert fragment in str(err.value), str(err.value)


def test_variants_json(tmp_path):
  vs = sweep.expand([{"product": {"expansion": [1, 2], "seed": [0, 1]}}], REG)
  groups = sweep.group(vs, REG)
  path = tmp_path / "variants.json"
  sweep.write_variants_json(str(path), groups)
  data = json.loads(path.read_text())
  assert [v["id"] for v in data["variants"]] == ["v000", "v001", "v002", "v003"]
  assert data["variants"][2]["group"] == "g1" and data["variants"][2]["hparams"]["expansion"] == 2
  assert [g["size"] for g in data["groups"]] == [2, 2]

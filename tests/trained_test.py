"""Tests for jaxsae.grid.trained: a grid reads back from its workdir without sampling, equal to
what the training job computed, and old workdirs (no setup.json) still load."""

import os
import shutil

import jax
import numpy as np
import pytest

import fakes
from jaxsae import grammars
from jaxsae.core import jsonio
from jaxsae.grid import grid_setup
from jaxsae.grid import grid_step
from jaxsae.grid import train_sae
from jaxsae.grid import trained as trained_lib

_SWEEP = [{"product": {"sparsity_coeff": [1.0, 4.0]}, "set": {"loss": "local"}}]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  """(config, sae workdir) of a 2-step run whose token capacity is probed."""
  root = tmp_path_factory.mktemp("trained")
  config = fakes.smoke_sae_config(fakes.write_smoke_lm(str(root / "lm")), _SWEEP, steps=2,
                                  log_every=2, checkpoint_every=2, token_capacity=0)
  workdir = str(root / "sae")
  train_sae.run(config, workdir)
  return config, workdir


def _refuse_sampling(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("trained.load sampled data")
  monkeypatch.setattr(grammars, "sample", refuse)
  monkeypatch.setattr(grid_setup, "probe_capacity", refuse)


def test_load_samples_nothing_and_equals_the_training_run(grid, monkeypatch):
  config, workdir = grid
  # What the job computed, in-process: the probed setup and the state after `steps` steps.
  setup, lm, root = train_sae.prepare(config)
  state = grid_setup.place_state(grid_setup.init_grid(setup, lm, root), setup)
  hypers = tuple(grid_step.group_hyper(s) for s in setup.specs)
  chunk = train_sae.make_chunk_fn(setup, config.log_every, state)
  state, _ = chunk(state, hypers, lm.params, jax.random.fold_in(root, grid_setup.DATA_STREAM))
  assert setup.capacity < setup.batch_size * setup.forward_len  # a probed capacity

  _refuse_sampling(monkeypatch)
  trained = trained_lib.load(workdir)
  assert trained.setup.capacity == setup.capacity
  assert jsonio.read(os.path.join(workdir, "summary.json"))["token_capacity"] == setup.capacity
  assert trained.variant_ids == ("v000", "v001")
  assert int(trained.state.step) == config.steps
  want, got = jax.tree.leaves(state), jax.tree.leaves(trained.state)
  assert len(want) == len(got) > 0
  for a, b in zip(want, got):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(trained.variant("v001").params["w_dec"]),
                                np.asarray(state.groups[0].params["w_dec"])[1])


def test_workdir_without_setup_record_probes_again(grid, tmp_path, monkeypatch):
  _, workdir = grid
  recorded = trained_lib.recorded_capacity(workdir)
  assert recorded is not None
  old = str(tmp_path / "old")  # a workdir as written before setup.json existed
  shutil.copytree(workdir, old)
  os.remove(os.path.join(old, trained_lib.SETUP_FILE))
  calls = []
  probe = grid_setup.probe_capacity
  monkeypatch.setattr(grid_setup, "probe_capacity",
                      lambda *a, **k: calls.append(1) or probe(*a, **k))
  assert trained_lib.load(old).setup.capacity == recorded
  assert calls == [1]
  assert not os.path.exists(os.path.join(old, trained_lib.SETUP_FILE))  # load writes nothing

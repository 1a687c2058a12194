"""Fields shared by the SAE-grid configs (`sae_e2e.py`, `sae_menon.py`); not a config itself."""

import ml_collections


def base_config(*, language: str, lm_workdir: str) -> ml_collections.ConfigDict:
  """Every non-sweep field of `jaxsae.grid.train_sae`, with the e2e_sae optimisation profile."""
  c = ml_collections.ConfigDict()
  c.job = "sae"  # experiments.main job
  c.language = language  # must match the LM's grammar ('' = take the LM's)
  c.lm_workdir = lm_workdir  # workdir of a finished `lm` job (its checkpoints are loaded)
  c.site = "resid_post.0"  # SAE site (Menon: res0 = resid_post.0 = resid_pre.1)
  c.positions = "sentence"  # tokens trained on: 'sentence' or 'all' (non-pad positions)
  c.batch_size = 32  # sequences per step
  c.max_len = 0  # sequence length sampled (tokens; 0: the LM's training length)
  c.forward_len = 0  # positions run through the LM (<= max_len, later ones dropped; 0: max_len)
  c.token_capacity = 0  # selected tokens gathered per step for local groups (0: probe, -1: all)
  c.steps = 1000  # optimizer steps
  c.log_every = 50  # steps per host call (lax.scan), metrics fetched once per call
  c.checkpoint_every = 500  # steps between checkpoints (multiple of log_every)
  c.keep_checkpoints = 2  # checkpoints kept
  c.schedule = "warmup_cosine"  # 'warmup_cosine' (e2e paper) or 'constant' (Menon)
  c.warmup_steps = 50  # linear warm-up steps
  c.lr_floor = 0.1  # cosine decays to lr_floor × peak lr
  c.decay_steps = 0  # cosine horizon in steps (0: steps; set it to extend a run unchanged)
  c.grad_clip = 1.0  # global grad-norm clip per variant (1 for tiny models)
  c.adam_b1 = 0.9  # Adam β1
  c.adam_b2 = 0.999  # Adam β2
  c.adam_eps = 1e-8  # Adam ε
  c.seed = 0  # data seed (SAE init seeds are per variant, in the sweep)
  c.mesh_variant_devices = -1  # devices on the mesh's variant axis (-1: all; rest: data)
  c.variant_loop = "auto"  # 'vmap' | 'map' (variants one by one in the step) | 'auto' (map on CPU)
  c.distributed = False  # start jax.distributed first (several hosts / processes, one grid)
  c.coordinator_address = ""  # distributed: 'host:port' of process 0 ('' = cluster detection)
  c.num_processes = 0  # distributed: processes in all (0 = cluster detection)
  c.process_id = -1  # distributed: this process's index (-1 = cluster detection)
  c.heartbeat_s = 100  # distributed: seconds of silence after which a process counts as dead
  return c

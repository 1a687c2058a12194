"""Several JAX processes (hosts) training one grid: start-up, host copies of global arrays, writers.

A grid's mesh spans every device of every process (`jax.devices()`), so after
`initialize` the same jitted step runs on all hosts at once; each process holds only its own
devices' shards of the state. Three things then differ from one process:

- the distributed runtime must be started before any computation (`initialize`), with the
  coordinator's address, the process count and this process's id, or detected from the cluster
  (TPU pods, Slurm, Open MPI); on CPU hosts the cross-process collectives use gloo;
- values read on the host (metrics, the frozen flags, a checkpoint's arrays) are gathered from
  all processes first (`to_host`): every process gets the whole value;
- workdir files are written by one process only (`is_writer`); checkpoints are written by all
  processes together (Orbax synchronises them), from the gathered, identical host copies.

If a process dies, the others stop at their next collective once the coordinator's heartbeat
times out (`heartbeat_s`), with an error naming the lost process, instead of waiting forever.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


def initialize(config) -> None:
  """Starts the distributed runtime for a config with `distributed=True` (no-op otherwise).

  Fields read: `coordinator_address` ('' = detect from the cluster), `num_processes` (0 =
  detect), `process_id` (-1 = detect), `heartbeat_s` (seconds without a heartbeat after which a
  process counts as dead). Call before any other JAX computation of the process.

  Raises:
    ValueError: an incomplete explicit setting (address without count or id, id out of range).
  """
  if not config.get("distributed", False):
    return
  address = config.get("coordinator_address", "")
  n, pid = int(config.get("num_processes", 0)), int(config.get("process_id", -1))
  explicit = (bool(address), n > 0, pid >= 0)
  if any(explicit) and not all(explicit):
    raise ValueError(
        f"distributed=True with coordinator_address={address!r}, num_processes={n}, "
        f"process_id={pid}: give all three (e.g. 'localhost:12355', 2, 0 on the first process "
        "and 1 on the second) or none of them (cluster detection on TPU pods, Slurm, Open MPI)")
  if all(explicit) and not 0 <= pid < n:
    raise ValueError(f"process_id={pid} must lie in [0, num_processes={n})")
  if jax.distributed.is_initialized():
    return
  # CPU devices need a cross-process collective implementation (XLA's default has none);
  # accelerators bring their own, and the setting does not touch them.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"heartbeat_timeout_seconds": int(config.get("heartbeat_s", 100))}
  if all(explicit):
    kwargs.update(coordinator_address=address, num_processes=n, process_id=pid)
  jax.distributed.initialize(**kwargs)
  logging.info("distributed: process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_writer() -> bool:
  """True in the one process that writes workdir files (process 0)."""
  return jax.process_index() == 0


def to_host(tree: Any) -> Any:
  """Whole host (numpy) copies of the arrays of `tree`, gathered from every process if needed.

  Every process must call it with the same tree (the gather is a collective).
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if jax.process_count() == 1 or all(
      not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
    return jax.device_get(tree)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(one, tree)


class PeerLostError(RuntimeError):
  """Another process of a distributed run stopped answering (it died or was preempted)."""


_PEER_SIGNS = ("gloo", "connection closed", "heartbeat", "coordination", "barrier",
               "unavailable", "socket closed")


@contextlib.contextmanager
def peers_guard(what: str) -> Iterator[None]:
  """Turns a lost peer's runtime error (a collective or barrier that failed) into a
  `PeerLostError` that says what happened and how to resume; other errors pass unchanged."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if jax.process_count() == 1 or not any(s in text.lower() for s in _PEER_SIGNS):
      raise
    first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
    raise PeerLostError(
        f"process {jax.process_index()} of {jax.process_count()} lost contact with the other "
        f"processes during {what} ({type(e).__name__}: {first}). Another process of this "
        "distributed run has most likely died; see its log. Completed checkpoints are kept: "
        "rerun every process with the same command to resume from the last one.") from e

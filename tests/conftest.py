"""Shared pytest configuration: strict numerics and CPU-only, deterministic JAX.

The tests are dominated by compilation of small programs, so XLA's backend (LLVM) optimisation
is turned down (about 30% less wall time for the training tests); results are still compared
run against run under the same flags, and against independent references with tolerances.

The same small programs are also compiled again and again: by the separate-run halves of the
grid-equivalence tests, and by the child processes of the pipeline, workdir, colab,
accelerator and multi-process tests. One persistent compilation cache per test run, shared by
the xdist workers and every process they start (the environment carries it), compiles each
program once. A cached executable is the one a fresh compilation would build (the key covers
the program, the flags and the backend), so no result changes; eviction is on so that every
read and write holds the cache's file lock (concurrent workers never read a half-written
entry). The directory is removed when the run ends.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]))
# Made by the first process that loads this file (the xdist controller, which loads it before it
# starts the workers, or the only process); the others inherit it. A cache the caller set is
# used as it is and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsae-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the process that made it
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

"""Does the LM generate sentences as long as its language's? Lengths of generations vs data.

A model can be 0.99 grammatical by generating short, easy sentences: every spliced number is
read against that clean baseline, so the LM job reports how far its generations' length
distribution is from the training distribution's, and its grammaticality per length bucket.

- `buckets`: length-bucket edges from the data's quantiles (so each bucket holds about the same
  share of the data, and the statistic does not depend on the language's length scale);
- `length_match`: the total variation distance between the bucketed length distributions of
  the generations and of held-out training sentences, the same distance for a sample of the
  data itself of the generations' size (the null: what sampling noise alone gives), mean
  lengths, and the grammatical fraction per bucket with Wilson intervals.

Generations without `<eos>` within the budget count in an overflow bucket (never in the data);
they count as ungrammatical, as in `generate.grammaticality`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsae.core import stats

NUM_BUCKETS = 8  # quantile buckets of the data's lengths
NULL_DRAWS = 200  # data subsamples for the null distance


def buckets(data_lengths: np.ndarray, num_buckets: int = NUM_BUCKETS) -> np.ndarray:
  """Upper edges (inclusive) of at most `num_buckets` length buckets, from the data's
  quantiles; the last edge is the data's maximum. Repeated quantiles merge buckets."""
  data_lengths = np.asarray(data_lengths)
  if data_lengths.size == 0:
    raise ValueError("no data lengths to bucket")
  qs = np.quantile(data_lengths, np.arange(1, num_buckets + 1) / num_buckets, method="lower")
  return np.unique(np.concatenate([qs, [data_lengths.max()]]).astype(np.int64))


def histogram(lengths: np.ndarray, edges: np.ndarray, finished: np.ndarray | None = None
              ) -> np.ndarray:
  """Counts per bucket `[len(edges) + 1]`: bucket i holds edges[i-1] < length <= edges[i];
  the last entry counts lengths beyond the last edge and unfinished generations."""
  lengths = np.asarray(lengths)
  idx = np.searchsorted(edges, lengths, side="left")
  if finished is not None:
    idx = np.where(np.asarray(finished, bool), idx, len(edges))
  return np.bincount(idx, minlength=len(edges) + 1)


def _tv(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
  return stats.total_variation(p_counts, q_counts)


def length_match(gen_lengths: np.ndarray, gen_finished: np.ndarray, gen_grammatical: np.ndarray,
                 data_lengths: np.ndarray, *, num_buckets: int = NUM_BUCKETS,
                 seed: int = 0) -> dict[str, Any]:
  """The generations' length distribution against the data's (all arrays flat, one per row).

  Args:
    gen_lengths: sentence lengths of the generations (tokens; any value where unfinished).
    gen_finished: bool, the generation emitted `<eos>` within its budget.
    gen_grammatical: bool, the exact recogniser accepted it.
    data_lengths: sentence lengths of held-out training-distribution sentences.
    num_buckets: quantile buckets of the data's lengths.
    seed: the null's subsampling stream.

  Returns:
    JSON-ready dict: `tv` (bucketed total variation, generations vs data), `tv_null` (mean and
    95th percentile of the same distance for `len(gen)` sentences drawn from the data without
    replacement when it is large enough, with replacement otherwise), `edges`, the two
    histograms, `mean_length` of finished generations and of the data, and `buckets`: per
    bucket the generations, the grammatical fraction and its Wilson 95% interval.
  """
  gen_lengths = np.asarray(gen_lengths).reshape(-1)
  gen_finished = np.asarray(gen_finished, bool).reshape(-1)
  gen_grammatical = np.asarray(gen_grammatical, bool).reshape(-1)
  data_lengths = np.asarray(data_lengths).reshape(-1)
  if not gen_lengths.size == gen_finished.size == gen_grammatical.size:
    raise ValueError("gen_lengths, gen_finished and gen_grammatical must have one entry per "
                     f"generation; got {gen_lengths.size}, {gen_finished.size}, "
                     f"{gen_grammatical.size}")
  edges = buckets(data_lengths, num_buckets)
  h_gen = histogram(gen_lengths, edges, gen_finished)
  h_data = histogram(data_lengths, edges)
  rng = np.random.default_rng(seed)
  n = gen_lengths.size
  replace = n > data_lengths.size // 2
  null = np.array([_tv(histogram(rng.choice(data_lengths, n, replace=replace), edges), h_data)
                   for _ in range(NULL_DRAWS)])
  idx = np.searchsorted(edges, gen_lengths, side="left")
  idx = np.where(gen_finished, idx, len(edges))
  per_bucket = []
  for b in range(len(edges) + 1):
    sel = idx == b
    k, m = int(gen_grammatical[sel].sum()), int(sel.sum())
    lo = int(edges[b - 1]) + 1 if b else int(data_lengths.min())
    per_bucket.append({
        "lengths": [lo, int(edges[b])] if b < len(edges) else f">{int(edges[-1])} or unfinished",
        "generations": m,
        "grammatical": stats.fraction(k, m) if m else None,
    })
  finished_lengths = gen_lengths[gen_finished]
  return {
      "tv": _tv(h_gen, h_data),
      "tv_null": {"mean": float(null.mean()), "p95": float(np.quantile(null, 0.95)),
                  "draws": NULL_DRAWS, "sample_size": n},
      "edges": edges.tolist(),
      "generated_counts": h_gen.tolist(),
      "data_counts": h_data.tolist(),
      "mean_length": {
          "generated": float(finished_lengths.mean()) if finished_lengths.size else None,
          "data": float(data_lengths.mean())},
      "buckets": per_bucket,
  }

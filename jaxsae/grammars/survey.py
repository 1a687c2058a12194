"""Survey a language: sample it, check every sample, and summarise it against exact values.

`run(config, workdir)` is the grammar job behind `experiments/configs/grammar.py`: it samples
`config.num_samples` sequences on device, checks each with the exact recogniser, computes the
length distribution, rejection rate, token mix and label statistics, compares them with the
exact length distribution (computed from the rules by dynamic programming, independent of the
sampler), and writes `report.md`, `report.json` and `lengths.png` into the workdir.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import numpy as np

from jaxsae.core import jsonio
from jaxsae.grammars import features
from jaxsae.grammars import library
from jaxsae.grammars import pcfg
from jaxsae.grammars import recognise
from jaxsae.grammars import rules as rules_lib
from jaxsae.grammars import sampler
from jaxsae.grammars import token_classes


def exact_length_distribution(grammar: pcfg.Grammar, max_sentence_len: int) -> np.ndarray:
  """P(sentence length = n), n = 0..max_sentence_len, before the length filter.

  Fixed-point iteration of the rules' length generating functions, truncated at the maximum
  (exact up to float64 rounding; it converges geometrically for subcritical grammars).
  """
  rules, _ = rules_lib.parse_rules(grammar.info.text)
  nts = grammar.info.nonterminals
  idx = {a: i for i, a in enumerate(nts)}
  width = max_sentence_len + 1
  dist = np.zeros((len(nts), width))
  unit = np.zeros(width)
  unit[1] = 1.0
  for _ in range(20_000):
    new = np.zeros_like(dist)
    for r in rules:
      d = np.zeros(width)
      d[0] = 1.0
      for s in r.rhs:
        d = np.convolve(d, dist[idx[s]] if s in idx else unit)[:width]
      new[idx[r.lhs]] += r.prob * d
    delta = np.abs(new - dist).max()
    dist = new
    if delta < 1e-15:
      break
  return dist[0]


def _quantile(x: np.ndarray, q: float) -> float:
  return float(np.quantile(x, q, method="inverted_cdf"))


def summarize(grammar: pcfg.Grammar, batch: sampler.Batch) -> dict[str, Any]:
  """Statistics of a sampled batch (host-side numbers, JSON-serialisable)."""
  toks = np.asarray(batch.tokens)
  lengths = np.asarray(batch.lengths)
  n = len(lengths)
  rejected = int(np.asarray(batch.rejections).sum())
  grammatical = np.asarray(recognise.is_grammatical(grammar, toks))
  sent = toks[:, grammar.prefix_len:]
  mask = np.arange(sent.shape[1])[None] < lengths[:, None]
  counts = np.bincount(sent[mask], minlength=grammar.n_terminals)
  cat_of = token_classes.token_category(grammar)
  cats = grammar.info.categories or grammar.info.terminals
  if not grammar.info.categories:
    cat_of = np.arange(grammar.n_terminals)
  mix = {c: float(counts[cat_of == i].sum() / counts.sum()) for i, c in enumerate(cats)}
  out = {
      "grammar": grammar.name,
      "kind": grammar.kind,
      "num_samples": n,
      "grammatical_fraction": float(grammatical.mean()),
      "rejection_rate": rejected / (rejected + n),
      "length": {
          "mean": float(lengths.mean()), "std": float(lengths.std()),
          "median": _quantile(lengths, 0.5), "p90": _quantile(lengths, 0.9),
          "max": int(lengths.max()), "min": int(lengths.min()),
      },
      "token_mix": mix,
  }
  lab = {k: np.asarray(v) for k, v in features.labels(grammar, toks).items()}
  depth_key = "depth_after" if "depth_after" in lab else "depth"
  if depth_key in lab:
    max_depth = lab[depth_key].max(axis=1)
    out["max_depth"] = {"label": depth_key, "mean": float(max_depth.mean()),
                        "p90": _quantile(max_depth, 0.9), "max": int(max_depth.max())}
  out["labels"] = {}
  for name, info in features.label_info(grammar).items():
    vals = lab[name][lab[name] >= 0]
    entry = {"kind": info.kind, "defined_fraction": float(vals.size / max(mask.sum(), 1)),
             "description": info.description}
    if vals.size:
      entry["mean"] = float(vals.mean())
      entry["histogram"] = np.bincount(vals).tolist()[:32]
    out["labels"][name] = entry
  return out


def compare_with_exact(grammar: pcfg.Grammar, stats: dict[str, Any], max_sentence_len: int,
                       draws: int) -> dict[str, Any]:
  """Exact rejection rate, mean and quantiles, and the z-scores of the sample against them."""
  p = exact_length_distribution(grammar, max_sentence_len)
  accept = float(p.sum())
  q = p / accept
  n_arr = np.arange(len(q))
  mean = float((q * n_arr).sum())
  sd = math.sqrt(float((q * (n_arr - mean) ** 2).sum()))
  cdf = np.cumsum(q)
  n = stats["num_samples"]
  r = 1 - accept
  return {
      "rejection_rate": r,
      "mean_length": mean,
      "median": int(np.searchsorted(cdf, 0.5 - 1e-12)),
      "p90": int(np.searchsorted(cdf, 0.9 - 1e-12)),
      "z_rejection": (stats["rejection_rate"] - r) / max(math.sqrt(r * (1 - r) / draws), 1e-12),
      "z_mean_length": (stats["length"]["mean"] - mean) / (sd / math.sqrt(n)),
  }


def _plot_lengths(path: str, lengths: np.ndarray, exact: np.ndarray, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5))
  hist = np.bincount(lengths, minlength=len(exact)) / len(lengths)
  ax.bar(np.arange(len(hist)), hist, width=1.0, alpha=0.6, label="sampled")
  ax.plot(np.arange(len(exact)), exact / exact.sum(), "k.-", lw=0.8, ms=3, label="exact")
  ax.set_yscale("log")
  ax.set_xlabel("sentence length (tokens)")
  ax.set_ylabel("probability")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config, workdir: str) -> dict[str, Any]:
  """The grammar job: sample, check, summarise; writes report.md / report.json / lengths.png."""
  os.makedirs(workdir, exist_ok=True)
  grammar = library.get(config.language)
  key = jax.random.key(config.seed)
  max_sent = sampler.max_sentence_len(config.max_len)
  t0 = time.perf_counter()
  batch = sampler.sample(key, grammar, config.num_samples, config.max_len)
  jax.block_until_ready(batch.tokens)
  t_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  batch = sampler.sample(jax.random.fold_in(key, 1), grammar, config.num_samples, config.max_len)
  jax.block_until_ready(batch.tokens)
  t_sample = time.perf_counter() - t0
  t0 = time.perf_counter()
  stats = summarize(grammar, batch)
  t_check = time.perf_counter() - t0
  draws = int(np.asarray(batch.rejections).sum()) + config.num_samples
  stats["exact"] = compare_with_exact(grammar, stats, max_sent, draws)
  stats["timing"] = {"sample_s": t_sample, "first_call_s": t_first,
                     "sentences_per_s": config.num_samples / t_sample,
                     "check_and_label_s": t_check}
  stats["examples"] = grammar.decode(np.asarray(batch.tokens[: config.num_examples]),
                                     sentence_only=True)
  stats["config"] = config.to_dict()
  exact_p = exact_length_distribution(grammar, max_sent)
  _plot_lengths(os.path.join(workdir, "lengths.png"), np.asarray(batch.lengths), exact_p,
                f"{grammar.name}: sentence lengths (n={config.num_samples})")
  jsonio.write(os.path.join(workdir, "report.json"), stats, indent=2)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(render_markdown(stats))
  return stats


def render_markdown(stats: dict[str, Any]) -> str:
  """The human-readable report (every number read from `stats`)."""
  ex, ln = stats["exact"], stats["length"]
  lines = [
      f"# Grammar survey: {stats['grammar']}",
      "",
      f"{stats['num_samples']} sentences sampled on {jax.default_backend()} in "
      f"{stats['timing']['sample_s']:.3f} s ({stats['timing']['sentences_per_s']:,.0f} "
      "sentences/s after compilation).",
      "",
      f"- grammatical (exact recogniser): **{stats['grammatical_fraction']:.4f}**",
      "",
      "| statistic | sampled | exact | z |",
      "|---|---|---|---|",
      f"| rejection rate (length filter) | {stats['rejection_rate']:.4f} | "
      f"{ex['rejection_rate']:.4f} | {ex['z_rejection']:+.2f} |",
      f"| mean length | {ln['mean']:.3f} | {ex['mean_length']:.3f} | {ex['z_mean_length']:+.2f} |",
      f"| median length | {ln['median']:g} | {ex['median']} | |",
      f"| p90 length | {ln['p90']:g} | {ex['p90']} | |",
      f"| max length | {ln['max']} | | |",
      "",
      "Token mix: " + ", ".join(f"{k} {v:.1%}" for k, v in stats["token_mix"].items()),
      "",
  ]
  if "max_depth" in stats:
    d = stats["max_depth"]
    lines += [f"Maximum {d['label']} per sentence: mean {d['mean']:.2f}, p90 {d['p90']:g}, "
              f"max {d['max']}.", ""]
  lines += ["## Labels", "", "| label | kind | defined on | mean |", "|---|---|---|---|"]
  for name, e in stats["labels"].items():
    lines.append(f"| {name} | {e['kind']} | {e['defined_fraction']:.1%} of sentence tokens | "
                 f"{e.get('mean', float('nan')):.3f} |")
  lines += ["", "## Examples", ""] + [f"- `{s}`" for s in stats["examples"]]
  lines += ["", "![lengths](lengths.png)", ""]
  return "\n".join(lines)

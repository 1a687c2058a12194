"""Grammar throughput: compiled sampler and recognisers vs plain Python and NLTK.

    pip install -e '.[benchmarks]'   # NLTK, for the baseline parser only
    python benchmarks/grammars.py [--languages dyck2,expr_prefix,english] [--n 20000]

Prints one JSON object: per language, sentences/s for
- `sample_jax`: `jaxsae.grammars.sample` (batch of n, after compilation, median of repeats);
- `sample_python`: a straightforward recursive Python sampler with the same length filter;
- `recognise_jax`: `is_grammatical` (linear scans for Dyck/Expr, the boolean CKY recogniser
  for English);
- `parse_jax`: the CKY/inside parser (`parse`: verdict, log-probability, depths) on all n;
- `parse_nltk`: NLTK's ViterbiParser on a time-boxed subset of the same sentences;
and the speed-ups. Target: >= 50x both baselines on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import jax
import numpy as np

from jaxsae import grammars
from jaxsae.grammars import rules as rules_lib


def _timed(fn, repeats=3):
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _python_sampler(grammar, limit):
  rules: dict[str, list[tuple[tuple[str, ...], float]]] = {}
  for r in rules_lib.parse_rules(grammar.info.text)[0]:
    rules.setdefault(r.lhs, []).append((r.rhs, r.prob))
  start = grammar.info.nonterminals[0]
  rng = random.Random(0)

  def one():
    while True:
      out: list[str] = []

      def expand(sym):
        if len(out) > limit:
          return
        alts = rules.get(sym)
        if alts is None:
          out.append(sym)
          return
        u, acc = rng.random(), 0.0
        for rhs, p in alts:
          acc += p
          if u < acc:
            break
        for s in rhs:
          expand(s)

      expand(start)
      if len(out) <= limit:
        return out

  return one


def _nltk_parser(grammar):
  import nltk  # pylint: disable=g-import-not-at-top
  lines = []
  for r in rules_lib.parse_rules(grammar.info.text)[0]:
    rhs = " ".join(s if s in grammar.info.nonterminals else f"'{s}'" for s in r.rhs)
    lines.append(f"{r.lhs} -> {rhs} [{r.prob!r}]")
  return nltk.ViterbiParser(nltk.PCFG.fromstring("\n".join(lines)))


def bench_language(name: str, n: int, time_box: float) -> dict:
  g = grammars.get(name)
  key = jax.random.key(0)
  out: dict = {"n": n}
  t = _timed(lambda: grammars.sample(key, g, n).tokens)
  out["sample_jax"] = n / t
  batch = grammars.sample(key, g, n)
  toks = np.asarray(batch.tokens)
  t = _timed(lambda: grammars.is_grammatical(g, toks))
  out["recognise_jax"] = n / t
  t = _timed(lambda: grammars.parse(g, toks).logprob, repeats=1)
  out["parse_jax"] = n / t

  sampler = _python_sampler(g, grammars.max_sentence_len(128))
  count, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < time_box:
    sampler()
    count += 1
  out["sample_python"] = count / (time.perf_counter() - t0)

  try:
    parser = _nltk_parser(g)
  except ImportError:
    out["parse_nltk"] = None
  else:
    sentences = [s.split() for s in g.decode(toks, sentence_only=True)]
    count, t0 = 0, time.perf_counter()
    for words in sentences:
      if time.perf_counter() - t0 > time_box:
        break
      trees = list(parser.parse(words))
      assert trees, words  # every sample is grammatical
      count += 1
    out["parse_nltk"] = count / (time.perf_counter() - t0)
    out["parse_nltk_sentences"] = count
  out["speedup_sample"] = out["sample_jax"] / out["sample_python"]
  if out["parse_nltk"]:
    out["speedup_recognise_vs_nltk"] = out["recognise_jax"] / out["parse_nltk"]
    out["speedup_parse_vs_nltk"] = out["parse_jax"] / out["parse_nltk"]
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--languages", default="dyck2,dyck2_p03,expr_prefix,expr_postfix,english")
  p.add_argument("--n", type=int, default=20_000)
  p.add_argument("--time_box", type=float, default=10.0, help="seconds per Python baseline")
  args = p.parse_args()
  result = {
      "machine": {"backend": jax.default_backend(), "devices": len(jax.devices()),
                  "cpus": os.cpu_count(), "python": sys.version.split()[0],
                  "jax": jax.__version__, "platform": platform.platform()},
      "languages": {name: bench_language(name, args.n, args.time_box)
                    for name in args.languages.split(",")},
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()

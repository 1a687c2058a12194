#!/bin/bash
# Runs the reproduction studies (experiments/configs/study.py) side by side, resumably, and
# collects their small outputs (reports, plots, JSON; no checkpoints) as they appear.
#
#   bash experiments/studies.sh WORKROOT RESULTS [SETTINGS] [STUDY:LANGUAGE[:EXTRA] ...]
#
# WORKROOT holds one workdir per study (rerun the same command to resume: finished stages are
# skipped); RESULTS receives <study>_<language>/ with report.md, report.json, *.png and the
# stage outputs (stages.json, lm/summary.json, sae/variants.json, sae/summary.json,
# sae/metrics.jsonl, eval/*.json, analysis/*.json), copied every 20 s and at the end.
# SETTINGS are appended to every study's config argument (default `full`, the papers' SAE
# budget: an accelerator job; `""` for the CPU budget; `smoke` for a quick check). Default studies: frontier and menon
# on dyck2, expr_prefix and english, and causal on english.
# EXTRA (optional, comma-separated) is appended to that study's settings only, e.g.
# `frontier:dyck2:seed=42`. A study whose workdir has no lm/ yet copies LM_FROM/<language>/lm
# when LM_FROM is set (an LM trained with the same config, e.g. on another machine: the LM stage
# then finds it finished and only re-reads it).
# MAX_PARALLEL (default: all) runs at most that many studies at once, starting the next as one
# ends, in the order given (e.g. MAX_PARALLEL=2 on a 2-core machine, where side-by-side studies
# only share the cores). STUDIES_POLL (seconds, default 20) is how often outputs are collected.
# STUDY_TIMEOUT (seconds, default none) stops every study at that wall time; what finished stays
# (finished stages, the SAE grid's checkpoints, the evaluation's finished groups), and compiled
# programs are kept in JAX's persistent cache (JAX_COMPILATION_CACHE_DIR, default
# WORKROOT/jax_cache), so a rerun resumes without compiling again.
set -u
root=${1:?WORKROOT}; results=${2:?RESULTS}; settings=${3-full}; shift $(( $# < 3 ? $# : 3 ))
studies=("$@")
if [ ${#studies[@]} -eq 0 ]; then
  studies=(frontier:dyck2 frontier:expr_prefix frontier:english menon:dyck2 menon:expr_prefix
           menon:english causal:english)
fi
py=${PYTHON:-python}
mkdir -p "$root" "$results"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$root/jax_cache}
# A size bound turns on the cache's file lock: studies running side by side never read an entry
# another is still writing.
export JAX_COMPILATION_CACHE_MAX_SIZE=${JAX_COMPILATION_CACHE_MAX_SIZE:-$((32 << 30))}

collect() {
  (cd "$root" && find . -path '*/checkpoints' -prune -o -type f \
      \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' -o -name '*.log' \) \
      -size -8M -print) | while read -r f; do
    mkdir -p "$results/$(dirname "$f")" && cp -p "$root/$f" "$results/$f"
  done
}

poll=${STUDIES_POLL:-20}
max_parallel=${MAX_PARALLEL:-${#studies[@]}}
if ! [[ "$max_parallel" =~ ^[1-9][0-9]*$ ]]; then
  echo "MAX_PARALLEL=$max_parallel: give a positive number of studies to run at once" >&2; exit 2
fi
pids=()
reap() {
  for i in "${!pids[@]}"; do kill -0 "${pids[$i]}" 2>/dev/null || unset 'pids[i]'; done
}
for entry in "${studies[@]}"; do
  reap
  while [ ${#pids[@]} -ge "$max_parallel" ]; do collect; sleep "$poll"; reap; done
  IFS=: read -r study lang extra <<< "$entry"; name=${study}_${lang}
  opts=$settings${extra:+${settings:+,}$extra}
  mkdir -p "$root/$name"
  if [ -n "${LM_FROM:-}" ] && [ ! -e "$root/$name/lm" ] && [ -d "$LM_FROM/$lang/lm" ]; then
    cp -r "$LM_FROM/$lang/lm" "$root/$name/lm"
  fi
  ${STUDY_TIMEOUT:+timeout "$STUDY_TIMEOUT"} "$py" -m experiments.main \
      --config="experiments/configs/study.py:study=$study,language=$lang${opts:+,$opts}" \
      --workdir="$root/$name" > "$root/$name/run.log" 2>&1 &
  pids+=($!)
  echo "started $name (pid $!)"
done
reap
while [ ${#pids[@]} -gt 0 ]; do collect; sleep "$poll"; reap; done
wait
collect
for entry in "${studies[@]}"; do
  IFS=: read -r study lang extra <<< "$entry"; name=${study}_${lang}
  if [ -f "$root/$name/report.json" ]; then echo "$name: report written"; else
    echo "$name: no report yet (rerun to resume); last log lines:"; tail -3 "$root/$name/run.log"; fi
done

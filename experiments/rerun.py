"""Re-runs the analysis (and the report) of a finished pipeline workdir with the current code.

    python -m experiments.rerun --workdir=DIR [--stages=analysis]

For a workdir the pipeline job wrote: its own config.json is used, the LM, the SAE grid and
the evaluation are kept, and the named stages and every later one run again (`--stages=report`
only re-renders). The previous analysis outputs are kept in `DIR/analysis.prev/`. Use it after
the analysis itself changed (the job alone skips stages whose config did not change).
"""

from absl import app
from absl import flags

from jaxsae import pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished pipeline workdir.")
_STAGES = flags.DEFINE_list("stages", ["analysis"],
                            f"Stages to re-run, among {', '.join(pipeline.RERUNNABLE)}.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  pipeline.rerun(_WORKDIR.value, _STAGES.value)
  print(f"report.md: {_WORKDIR.value}/report.md")


if __name__ == "__main__":
  app.run(main)

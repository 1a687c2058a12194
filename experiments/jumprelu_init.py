"""Which initial threshold lets JumpReLU SAEs reach a useful L0 at the benchmark's budget?

    python -m experiments.jumprelu_init --lm=/work/lms/dyck2/lm --workdir=/tmp/jumprelu_init \
        [--language=dyck2] [--seed=42] [--thresholds=0.001:0.001,0.01:0.05,0.1:0.05,0.3:0.1,1:0.3] \
        [--lr_scales=1]

Trains the `bench` study's SAE config (CPU budget: 800 steps of 32 sequences, expansion 4 at
resid_post.0, local loss) with JumpReLU SAEs at λ ∈ {0.5, 2, 8, 32} for each `θ0:bandwidth` pair,
and each `jumprelu_threshold_lr_scale` of `--lr_scales`, all in one grid on the LM in `--lm`,
and prints one JSON object: the final training L0 and loss per (θ0, bandwidth, lr scale, λ).
Its result decides how `study.py`'s benchmark trains JumpReLU (`BENCH_ARCHS`).
"""

import json

from absl import app
from absl import flags

from experiments.configs import study
from jaxsae.grid import train_sae

_LM = flags.DEFINE_string("lm", None, "LM workdir (the LM job's output)", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "SAE grid workdir (resumable)", required=True)
_LANGUAGE = flags.DEFINE_string("language", "dyck2", "the LM's language")
_SEED = flags.DEFINE_integer("seed", 42, "data and SAE seed (the committed Dyck-2 bench's: 42)")
_LR_SCALES = flags.DEFINE_string("lr_scales", "1",
                                 "comma-separated jumprelu_threshold_lr_scale values (each pair × each)")
_PAIRS = flags.DEFINE_string("thresholds", "0.001:0.001,0.01:0.05,0.1:0.05,0.3:0.1,1:0.3",
                             "comma-separated θ0:bandwidth pairs")
LAMBDAS = [0.5, 2.0, 8.0, 32.0]


def main(argv):
  del argv
  pairs = [tuple(float(x) for x in p.split(":")) for p in _PAIRS.value.split(",")]
  c = study.build(study="bench", language=_LANGUAGE.value, seed=_SEED.value, seeds=1).sae
  c.lm_workdir = _LM.value
  scales = [float(x) for x in _LR_SCALES.value.split(",")]
  c.sweep = [{"product": {"sparsity_coeff": LAMBDAS},
              "set": {"activation": "jumprelu", "loss": "local", "expansion": 4,
                      "jumprelu_init_threshold": th, "jumprelu_bandwidth": bw,
                      **({} if scale == 1 else {"jumprelu_threshold_lr_scale": scale})}}
             for th, bw in pairs for scale in scales]
  summary = train_sae.run(c, _WORKDIR.value)
  rows = []
  for vid, v in sorted(summary["variants"].items()):
    hp, m = v["hparams"], v["metrics"]
    rows.append({"id": vid, "theta0": hp["jumprelu_init_threshold"],
                 "bandwidth": hp["jumprelu_bandwidth"], "lambda": hp["sparsity_coeff"],
                 "lr_scale": hp.get("jumprelu_threshold_lr_scale", 1.0),
                 "l0": m.get("l0"), "loss": m.get("loss"), "dead_fraction": m.get("dead_fraction")})
  print(json.dumps({"language": _LANGUAGE.value, "steps": c.steps, "batch_size": c.batch_size,
                    "rows": rows}, indent=1))


if __name__ == "__main__":
  app.run(main)

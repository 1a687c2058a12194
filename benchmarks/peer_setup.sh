#!/usr/bin/env bash
# Creates the PyTorch peer's virtual environment for `benchmarks/sae.py`: torch 2.13.0 (CPU),
# transformer_lens and e2e_sae 2.1.1, pinned in benchmarks/peer_requirements.txt. The project's
# own environment never gets torch.
#
#   bash benchmarks/peer_setup.sh [VENV_DIR]     # default: benchmarks/.peer-venv (git-ignored)
#
# About 1.5 GB and a minute where the CPU torch wheel is on local disk (pip takes it for
# torch==2.13.0); elsewhere the registry's torch 2.13.0 is the CUDA build (several GB). Ends by
# building the peer's model once (`peer_e2e_sae.py --check`) and printing the versions.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/.peer-venv}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "e2e_sae 2.1.1 needs Python >= 3.11"'
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet -r "$here/peer_requirements.txt"
"$venv/bin/python" -m pip install --quiet --no-deps e2e_sae==2.1.1
"$venv/bin/python" "$here/peer_e2e_sae.py" --check
echo "peer environment ready: $venv (benchmarks/sae.py finds it there by default)" >&2

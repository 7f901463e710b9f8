#!/usr/bin/env bash
# The main job: set up .venv if needed, then parallelize real training steps (MLP, GPT) over
# 8 simulated CPU devices, print the plans and check every step against jax.jit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import meshweave, optax" 2>/dev/null || scripts/setup.sh
exec .venv/bin/python examples/train.py "$@"

#!/usr/bin/env bash
# Step time, MFU and memory of the DDPM and 3D configs on this machine's
# JAX device (see accelerator.py for the flags), e.g. on one H100:
#   experiments/benchmarks/accelerator.sh --out=h100.json
# and, on any machine, what each config needs of a device's memory:
#   experiments/benchmarks/accelerator.sh --memory_only
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import jax; print('devices:', jax.devices())"
exec python experiments/benchmarks/accelerator.py "$@"

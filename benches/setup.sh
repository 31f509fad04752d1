#!/usr/bin/env bash
# Creates the Python environment the benches/ scripts compare against:
# .venv from scripts/setup-venv.sh (torch, transformers, xllamacpp, aiohttp)
# plus DuckDB for benches/select_vs_duckdb.py. Idempotent; run from anywhere.
#
#   benches/setup.sh && .venv/bin/python benches/select_vs_duckdb.py
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
if ! .venv/bin/python -c 'import duckdb' 2>/dev/null; then
  .venv/bin/pip install --quiet "duckdb==2.0.0"
fi
echo "benches: .venv ready (torch, transformers, duckdb, xllamacpp, aiohttp)"

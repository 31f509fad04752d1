#!/usr/bin/env bash
# Runs every bench script of issue 11's table in one go, each printing both
# tools' figures and the ratio, with the load average before each (a quiet
# machine reads < 0.3 on 2 cores; figures taken under load mislead).
#
#   cargo build --release --bin prefpipe && benches/setup.sh && benches/all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
run() {
  echo "== $* (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
  "$py" "$@" || echo "!! $1 exited $?"
}
run benches/select_vs_duckdb.py --runs 3
run benches/select_vs_duckdb.py --strategy small_margin --prompts 200000 --runs 3
run benches/select_vs_duckdb.py --strategy repeat_ranking --prompts 200000 --runs 3
run benches/models_vs_transformers.py
run benches/score_vs_transformers.py
run benches/train_vs_torch.py
[ -f benches/gguf_vs_llamacpp.py ] && run benches/gguf_vs_llamacpp.py
echo "== done (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"

#!/usr/bin/env python3
"""GGUF generation: prefpipe's `generate` stage (candle quantized CPU matmuls)
vs the llama.cpp server (xllamacpp, the same C++ server `llama-server` runs).

Same model (SmolLM2-135M-Instruct Q4_1, scripts/fetch-smollm2.sh), same work as
pipelines/smollm2.yaml: 16 prompts x 4 samples x at most 96 new tokens, chat
template, temperature 0.7, top_p 0.9 (top_k and min_p off on both sides: the
server's defaults of 40 / 0.05 are overridden), same threads (RAYON_NUM_THREADS
for prefpipe; n_threads for llama.cpp), 16 sequences at a time on both sides
(prefpipe batch_size 16; 16 server slots with 16 requests in flight).

prefpipe: `prefpipe run` of source -> generate; the time is the generate stage's
elapsed_s from run.json (model load, tokenization, generation, Parquet write).
llama.cpp: the time from the first request sent to the last answer received
(model load, about 0.6 s, not included). Prints generated tokens/s for both
(each side's own generated-token count: sampling differs, EOS can come early),
the ratio, and peak RSS of each process.

    cargo build --release --bin prefpipe
    benches/setup.sh && scripts/fetch-smollm2.sh
    .venv/bin/python benches/gguf_vs_llamacpp.py [--threads 2] [--parallel 16]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from prefpipe_run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "data-samples/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0}


def prompts(n):
    seen, out = set(), []
    for line in open(os.path.join(ROOT, "data-samples/prompts.jsonl")):
        p = json.loads(line)["prompt"]
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) == n:
            break
    return out


def run_prefpipe(binary, work, ps, n, new_tokens, threads, batch):
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for p in ps:
            f.write(json.dumps({"prompt": p}) + "\n")
    run = Run(binary, work, f"""name: bench
seed: 1
stages:
  - id: prompts
    kind: source
    path: prompts.jsonl
  - id: samples
    kind: generate
    input: prompts
    model: {GGUF}
    n: {n}
    temperature: {SAMPLING['temperature']}
    top_p: {SAMPLING['top_p']}
    max_new_tokens: {new_tokens}
    chat_template: true
    batch_size: {batch}
""", threads)
    tokens = int(run.query("SELECT sum(n_tokens) AS n FROM samples")[0][0])
    return run.stages["samples"]["elapsed_s"], tokens, run.maxrss_mib


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_llamacpp(ps, n, new_tokens, threads, parallel):
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/servers/llamacpp.py"), "--threads", str(threads),
                               "--parallel", str(parallel), "--no-metrics"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            sys.exit(f"llama.cpp server did not start: {line!r}")
        url = f"http://127.0.0.1:{int(line.split()[1])}/v1/chat/completions"

        def one(job):
            prompt, seed = job
            body = dict(SAMPLING, model="smollm2", messages=[{"role": "user", "content": prompt}],
                        max_tokens=new_tokens, seed=seed)
            req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.load(r)["usage"]["completion_tokens"]

        jobs = [(p, 1000 * i + s) for i, p in enumerate(ps) for s in range(n)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            tokens = sum(pool.map(one, jobs))
        elapsed = time.perf_counter() - t0
        return elapsed, tokens, peak_rss_mib(server.pid)
    finally:
        server.kill()
        server.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=16, help="llama.cpp slots = prefpipe batch_size")
    ap.add_argument("--prefpipe", default=os.path.join(ROOT, "target/release/prefpipe"))
    args = ap.parse_args()
    if not os.path.exists(args.prefpipe):
        sys.exit(f"{args.prefpipe}: not built; run `cargo build --release --bin prefpipe` first")
    if not os.path.exists(GGUF):
        sys.exit(f"{GGUF} is missing: run scripts/fetch-smollm2.sh")

    ps = prompts(args.prompts)
    work = tempfile.mkdtemp(prefix="prefpipe-gguf-bench-")
    pp_s, pp_tokens, pp_rss = run_prefpipe(args.prefpipe, work, ps, args.samples, args.new_tokens, args.threads, args.parallel)
    lc_s, lc_tokens, lc_rss = run_llamacpp(ps, args.samples, args.new_tokens, args.threads, args.parallel)
    pp, lc = pp_tokens / pp_s, lc_tokens / lc_s
    print(f"generate: SmolLM2-135M-Instruct Q4_1, {len(ps)} prompts x {args.samples} samples x <= {args.new_tokens} new tokens, "
          f"{args.threads} threads, {args.parallel} at a time")
    print(f"  prefpipe:  {pp:8.1f} tokens/s ({pp_tokens} tokens in {pp_s:.2f}s: generate stage incl. model load)")
    print(f"  llama.cpp: {lc:8.1f} tokens/s ({lc_tokens} tokens in {lc_s:.2f}s: requests, model already loaded)")
    print(f"  ratio (prefpipe time per token / llama.cpp's): {lc / pp:.2f}x")
    print(f"peak RSS: prefpipe {pp_rss:.0f} MiB, llama.cpp server {lc_rss:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

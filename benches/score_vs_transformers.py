#!/usr/bin/env python3
"""Reward-model scoring: prefpipe's `score` stage (candle, CPU) vs transformers (PyTorch, CPU).

Same ~29M-parameter LlamaForSequenceClassification (built here with transformers
from a seeded config and saved as safetensors with the tiny fixture's tokenizer),
same 2,000 prompt/response rows (data-samples/scored.jsonl, cycled, each response
made unique), same sequences (DESIGN §4: prompt with special tokens ⊕ response ⊕ EOS),
same threads (torch.set_num_threads / RAYON_NUM_THREADS), same batch size, both
batching longest-first, right-padded with an attention mask.

prefpipe: `prefpipe run` of source → score; the time is the score stage's
elapsed_s from run.json (model load + digest, tokenization, scoring, Parquet write).
transformers: AutoModelForSequenceClassification (default attention, sdpa),
inference_mode; the time covers model load, tokenization and scoring.

Prints sequences/s for both, the time ratio (prefpipe seconds / transformers';
goal <= 1.0), the largest difference between the two
sides' rewards, and peak RSS.

    cargo build --release --bin prefpipe
    benches/setup.sh                         # .venv with torch, transformers, duckdb
    .venv/bin/python benches/score_vs_transformers.py [--rows 2000] [--batch 16] [--threads 2]
"""
import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

from prefpipe_run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "data-samples/models/tiny-llama-rm")


def build_model(out):
    """A ~29M-parameter Llama reward model (seeded), saved like a real checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if os.path.exists(os.path.join(out, "model.safetensors")):
        return
    tiny = json.load(open(os.path.join(TOKENIZER_DIR, "config.json")))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tiny["vocab_size"], hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024, rms_norm_eps=1e-6,
        bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"], pad_token_id=tiny["pad_token_id"],
        tie_word_embeddings=False, num_labels=1,
    )
    m = LlamaForSequenceClassification(cfg)
    m.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), out)
    print(f"model: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters -> {out}")


def rows(n):
    scored = [json.loads(l) for l in open(os.path.join(ROOT, "data-samples/scored.jsonl"))]
    out = []
    for i in range(n):
        r = scored[i % len(scored)]
        out.append({"prompt_id": f"q{i:05d}", "prompt": r["prompt"], "sample_idx": 0,
                    "response": r["response"] if i < len(scored) else f"{r['response']} ({i // len(scored)})"})
    return out


def run_transformers(model_dir, data, batch, threads):
    """In-process; returns (seconds incl. load, seconds scoring only, rewards by prompt_id, token count)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    t_load = time.perf_counter() - t0
    eos, pad = tok.eos_token_id, model.config.pad_token_id
    seqs = [(d["prompt_id"], tok(d["prompt"], add_special_tokens=True)["input_ids"]
             + tok(d["response"], add_special_tokens=False)["input_ids"] + [eos]) for d in data]
    seqs.sort(key=lambda s: -len(s[1]))
    rewards = {}
    with torch.inference_mode():
        for i in range(0, len(seqs), batch):
            group = seqs[i:i + batch]
            width = max(len(s) for _, s in group)
            ids = torch.tensor([s + [pad] * (width - len(s)) for _, s in group])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for _, s in group])
            scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
            rewards.update((pid, x) for (pid, _), x in zip(group, scores))
    total = time.perf_counter() - t0
    return total, total - t_load, rewards, sum(len(s) for _, s in seqs)


def run_prefpipe(binary, model_dir, work, data, batch, threads):
    with open(os.path.join(work, "rows.jsonl"), "w") as f:
        for d in data:
            f.write(json.dumps(d) + "\n")
    run = Run(binary, work, f"""name: bench
chunk_size: 100000
stages:
  - id: rows
    kind: source
    path: rows.jsonl
  - id: scored
    kind: score
    input: rows
    reward_models:
      - name: rm
        model: {model_dir}
    batch_size: {batch}
""", threads)
    rewards = {pid: float(x) for pid, x in run.query("SELECT prompt_id, reward_rm FROM scored")}
    return run.stages["scored"]["elapsed_s"], rewards, run.maxrss_mib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", default="/tmp/prefpipe-bench-llama-rm30m")
    ap.add_argument("--prefpipe", default=os.path.join(ROOT, "target/release/prefpipe"))
    args = ap.parse_args()
    if not os.path.exists(args.prefpipe):
        sys.exit(f"{args.prefpipe}: not built; run `cargo build --release --bin prefpipe` first")

    build_model(args.model_dir)
    data = rows(args.rows)
    work = tempfile.mkdtemp(prefix="prefpipe-score-bench-")
    pp_s, pp_rewards, pp_rss = run_prefpipe(args.prefpipe, args.model_dir, work, data, args.batch, args.threads)
    t_s, t_score_s, t_rewards, tokens = run_transformers(args.model_dir, data, args.batch, args.threads)
    t_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Differences relative to the spread of the rewards (a random head puts many rewards near 0).
    scale = max(abs(v) for v in t_rewards.values())
    worst = max(abs(pp_rewards[k] - v) for k, v in t_rewards.items())

    n = len(data)
    print(f"score: {n} prompt/response rows, {tokens} tokens (mean {tokens / n:.0f}/sequence), "
          f"batch {args.batch}, {args.threads} threads, f32 CPU")
    print(f"  prefpipe:     {n / pp_s:8.2f} sequences/s ({pp_s:.1f}s: score stage incl. model load and Parquet write)")
    print(f"  transformers: {n / t_s:8.2f} sequences/s ({t_s:.1f}s incl. model load; scoring alone {n / t_score_s:.2f} sequences/s)")
    print(f"  time ratio prefpipe/transformers (goal <= 1.0): {pp_s / t_s:.2f}")
    print(f"  largest reward difference: {worst:.2e} (rewards up to {scale:.3g} in magnitude: {worst / scale:.1e} of it)")
    print(f"peak RSS: prefpipe {pp_rss:.0f} MiB, transformers (python process) {t_rss:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

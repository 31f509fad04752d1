#!/usr/bin/env python3
"""generate + logprob: prefpipe (candle, CPU) vs transformers (PyTorch, CPU).

Same ~30M-parameter Llama (built here with transformers from a seeded config,
saved as safetensors with the tiny fixture's tokenizer), same prompts, same
threads (2), same batch size. Prints tokens/s for both, the time ratio
(prefpipe seconds per token / transformers'; goal <= 1.0), and peak RSS.
The model is 24M parameters (the issue's "20M Llama").

    cargo build --release --bin prefpipe
    benches/setup.sh                         # .venv with torch, transformers, duckdb
    .venv/bin/python benches/models_vs_transformers.py [--prompts 64] [--new-tokens 64]
"""
import argparse
import json
import os
import resource
import shutil
import tempfile
import time

from prefpipe_run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "data-samples/models/tiny-llama")


def build_model(out):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(out, "model.safetensors")):
        return
    tok_cfg = json.load(open(os.path.join(TOKENIZER_DIR, "config.json")))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok_cfg["vocab_size"], hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6,
        bos_token_id=tok_cfg.get("bos_token_id"), eos_token_id=tok_cfg.get("eos_token_id"),
        pad_token_id=tok_cfg.get("pad_token_id"), tie_word_embeddings=False,
    )
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), out)
    print(f"model: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters -> {out}")


def rows(n_prompts, n_pairs):
    prompts = [json.loads(l)["prompt"] for l in open(os.path.join(ROOT, "data-samples/prompts.jsonl"))][:n_prompts]
    scored = [json.loads(l) for l in open(os.path.join(ROOT, "data-samples/scored.jsonl"))][:n_pairs]
    return prompts, [(r["prompt"], r["response"]) for r in scored]


def run_transformers(model_dir, prompts, pairs, new_tokens, batch, threads):
    """In-process; returns (gen tokens/s, logprob tokens/s, generated token count)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen_tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=True)
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            gen_tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    gen_s = time.perf_counter() - t0

    # Teacher-forced log-probs, DESIGN §4: prompt (special tokens) + response + EOS.
    eos = tok.eos_token_id
    seqs = []
    for p, r in pairs:
        pi = tok(p, add_special_tokens=True)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append((pi, ri))
    lp_tokens = sum(len(a) + len(b) for a, b in seqs)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(seqs), batch):
            group = seqs[i:i + batch]
            L = max(len(a) + len(b) for a, b in group)
            ids = torch.full((len(group), L), tok.pad_token_id or 0)
            mask = torch.zeros((len(group), L), dtype=torch.long)
            for j, (a, b) in enumerate(group):
                s = a + b
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            lsm = torch.log_softmax(logits.float(), -1)
            for j, (a, b) in enumerate(group):
                pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)
                _ = lsm[j, pos, torch.tensor(b)].sum().item()
    lp_s = time.perf_counter() - t0
    return gen_tokens / gen_s, lp_tokens / lp_s, gen_tokens


def run_prefpipe(binary, model_dir, work, prompts, pairs, new_tokens, batch, threads):
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    with open(os.path.join(work, "pairs.jsonl"), "w") as f:
        for i, (p, r) in enumerate(pairs):
            f.write(json.dumps({"prompt_id": f"q{i}", "prompt": p, "response": r}) + "\n")
    run = Run(binary, work, f"""name: bench
chunk_size: 100000
stages:
  - id: prompts
    kind: source
    path: prompts.jsonl
  - id: gen
    kind: generate
    input: prompts
    model: {model_dir}
    n: 1
    temperature: 0
    max_new_tokens: {new_tokens}
    batch_size: {batch}
  - id: pairs
    kind: source
    path: pairs.jsonl
  - id: lp
    kind: logprob
    input: pairs
    model: {model_dir}
    batch_size: {batch}
""", threads)
    gen_tokens = int(run.query("SELECT sum(n_tokens) AS n FROM gen")[0][0])
    return run.stages, gen_tokens, run.maxrss_mib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", default="/tmp/prefpipe-bench-llama30m")
    ap.add_argument("--prefpipe", default=os.path.join(ROOT, "target/release/prefpipe"))
    args = ap.parse_args()

    build_model(args.model_dir)
    prompts, pairs = rows(args.prompts, args.pairs)
    work = tempfile.mkdtemp(prefix="prefpipe-models-bench-")
    st, pp_gen_tokens, pp_rss = run_prefpipe(args.prefpipe, args.model_dir, work, prompts, pairs,
                                             args.new_tokens, args.batch, args.threads)
    t_gen, t_lp, t_gen_tokens = run_transformers(args.model_dir, prompts, pairs, args.new_tokens, args.batch, args.threads)
    t_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # Token counts for logprob are the same sequences on both sides.
    import transformers  # noqa: F401  (version in the report)
    lp_tokens = None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    lp_tokens = sum(len(tok(p, add_special_tokens=True)["input_ids"]) + len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for p, r in pairs)
    pp_gen = pp_gen_tokens / st["gen"]["elapsed_s"]
    pp_lp = lp_tokens / st["lp"]["elapsed_s"]
    print(f"generate ({args.prompts} prompts x {args.new_tokens} new tokens, batch {args.batch}, {args.threads} threads, greedy)")
    print(f"  prefpipe:     {pp_gen:8.1f} tokens/s ({pp_gen_tokens} tokens, stage {st['gen']['elapsed_s']:.2f}s incl. model load)")
    print(f"  transformers: {t_gen:8.1f} tokens/s ({t_gen_tokens} tokens)")
    print(f"  time ratio prefpipe/transformers (goal <= 1.0): {t_gen / pp_gen:.2f}")
    print(f"logprob ({len(pairs)} prompt/response pairs, {lp_tokens} tokens, batch {args.batch})")
    print(f"  prefpipe:     {pp_lp:8.1f} tokens/s (stage {st['lp']['elapsed_s']:.2f}s)")
    print(f"  transformers: {t_lp:8.1f} tokens/s")
    print(f"  time ratio prefpipe/transformers (goal <= 1.0): {t_lp / pp_lp:.2f}")
    print(f"peak RSS: prefpipe {pp_rss:.0f} MiB, transformers (python process) {t_rss:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

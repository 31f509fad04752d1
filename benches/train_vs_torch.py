#!/usr/bin/env python3
"""Training steps per method: prefpipe's `train` stage (candle, CPU) vs the same loop in PyTorch.

Same ~30M-parameter Llama (built here with transformers from a seeded config,
saved as safetensors with the tiny fixture's tokenizer), same DPO pairs, same
settings (batch 8 pairs = 16 sequences, β 0.1, AdamW lr 1e-5, clipping at 1.0,
no shuffling), same threads (2). The reference is the initial policy; both
sides compute its log-probs once, before the loop. Steps/s is measured over
steps 2…N (step 1 warms up; prefpipe's from its metrics' `elapsed_s`, which
is taken after each update); peak memory is each process's max RSS. The
step-1 and last-step losses of both sides are printed as a check that they do the same work.

`--methods` runs several objectives (DESIGN §8), one prefpipe run and one
PyTorch loop each: dpo (sigmoid), hinge, ipo, robust (label_smoothing 0.1),
dpo+nll (nll_weight 1), orpo (lambda 0.1), simpo (beta 2, gamma 1). ORPO and
SimPO are reference-free, so neither side runs a reference forward for them.

    cargo build --release --bin prefpipe     # used as is when target/release/prefpipe has `train`
    benches/setup.sh   # or scripts/setup-venv.sh: .venv with torch and transformers
    .venv/bin/python benches/train_vs_torch.py [--steps 12] [--batch 8] [--threads 2] [--methods dpo,ipo,orpo,simpo]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "data-samples/models/tiny-llama")
BIN = os.path.join(ROOT, "target/release/prefpipe")


# name → (prefpipe YAML lines for the train stage, uses a reference model)
METHODS = {
    "dpo": ("method: dpo\n    beta: 0.1", True),
    "hinge": ("method: dpo\n    loss: hinge\n    beta: 0.1", True),
    "ipo": ("method: dpo\n    loss: ipo\n    beta: 0.1", True),
    "robust": ("method: dpo\n    loss: robust\n    label_smoothing: 0.1\n    beta: 0.1", True),
    "dpo+nll": ("method: dpo\n    nll_weight: 1.0\n    beta: 0.1", True),
    "orpo": ("method: orpo\n    lambda: 0.1", False),
    "simpo": ("method: simpo\n    beta: 2.0\n    gamma: 1.0", False),
}


def build_model(out):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_cfg = json.load(open(os.path.join(TOKENIZER_DIR, "config.json")))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok_cfg["vocab_size"], hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6,
        bos_token_id=tok_cfg.get("bos_token_id"), eos_token_id=tok_cfg.get("eos_token_id"),
        pad_token_id=tok_cfg.get("pad_token_id"), tie_word_embeddings=False,
    )
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), out)
    return sum(p.numel() for p in m.parameters())


def pairs(n):
    """Synthetic DPO pairs over the sample prompts (as pipelines/train-dpo.yaml)."""
    prompts = [json.loads(l)["prompt"] for l in open(os.path.join(ROOT, "data-samples/prompts.jsonl"))][:n]
    return [{"prompt": p[:64], "chosen": f'About "{p[:24]}": here is a careful answer. Thank you!',
             "rejected": f'About "{p[:24]}": no. Go away!'} for p in prompts]


def ensure_binary():
    ok = os.path.exists(BIN) and b"train" in subprocess.run([BIN, "kinds"], capture_output=True).stdout
    if not ok:
        print("building target/release/prefpipe …", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--bin", "prefpipe"], cwd=ROOT, check=True)


def timed(cmd, env=None, cwd=None):
    """Runs cmd under /usr/bin/time; returns (wall s, peak RSS MiB, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    rss_kib = int(p.stderr.strip().splitlines()[-1])
    return wall, rss_kib / 1024, p.stdout


def run_prefpipe(work, model, data, args, method):
    yaml = f"""name: bench-train-{method.replace("+", "-")}
stages:
  - id: pairs
    kind: source
    path: {data}
  - id: train
    kind: train
    input: pairs
    {METHODS[method][0]}
    model: {model}
    lr: 0.00001
    batch_size: {args.batch}
    max_steps: {args.steps}
    shuffle: false
    max_grad_norm: 1.0
    save_every: {args.steps}
    output: out/trained
    metrics: out/metrics.parquet
"""
    work = os.path.join(work, method)
    os.makedirs(work)
    with open(os.path.join(work, "p.yaml"), "w") as f:
        f.write(yaml)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), CANDLE_NUM_THREADS=str(args.threads))
    wall, rss, _ = timed([BIN, "run", "p.yaml", "--store", os.path.join(work, "store")], env=env, cwd=work)
    q = subprocess.run([BIN, "query", "SELECT step, loss, elapsed_s FROM train ORDER BY step", "--pipeline", "p.yaml",
                        "--store", os.path.join(work, "store"), "--format", "json"], capture_output=True, text=True, cwd=work, check=True)
    rows = [json.loads(l) for l in q.stdout.splitlines() if l.strip()]
    if len(rows) == 1 and isinstance(rows[0], list):
        rows = rows[0]
    first, last = rows[0], rows[-1]
    steps_per_s = (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])
    return {"steps_per_s": steps_per_s, "step1_loss": first["loss"], "last_loss": last["loss"], "peak_rss_mib": rss, "wall_s": wall}


def torch_worker(model_dir, data, steps, batch, threads, method):
    """The same training loop in PyTorch (DESIGN §8's loss for `method`); prints a JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    rows = [json.loads(l) for l in open(data)]
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # DESIGN §4: prompt with special tokens, response + EOS.
    ex = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=True).input_ids
        ex.append([(p, tok(r[k], add_special_tokens=False).input_ids + [eos]) for k in ("chosen", "rejected")])

    def seq_logps(m, seqs, whole=False):
        """Summed response log-probs and response token counts per sequence;
        with `whole`, also the summed log-probs and counts over prompt ⊕ response
        (ORPO's NLL term, which TRL takes over the whole sequence)."""
        width = max(len(p) + len(y) for p, y in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (p, y) in enumerate(seqs):
            ids[i, : len(p) + len(y)] = torch.tensor(p + y)
            mask[i, : len(p) + len(y)] = 1
        logits = m(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        sel = torch.zeros_like(logp)
        full = torch.zeros_like(logp)
        for i, (p, y) in enumerate(seqs):
            sel[i, len(p) - 1 : len(p) + len(y) - 1] = 1
            full[i, : len(p) + len(y) - 1] = 1
        out = ((logp * sel).sum(1), sel.sum(1))
        return out + ((logp * full).sum(1), full.sum(1)) if whole else out

    def batch_of(t):
        n = len(ex)
        idx = [((t - 1) * batch + k) % n for k in range(batch)]
        return [s for i in idx for s in ex[i]]  # chosen, rejected per pair

    F = torch.nn.functional
    ref = {}
    if METHODS[method][1]:
        with torch.no_grad():
            model.eval()
            for t in range(1, steps + 1):
                ref[t] = seq_logps(model, batch_of(t))[0].double()
            model.train()

    def loss_of(t):
        lp, n, lw, nw = (x.double() for x in seq_logps(model, batch_of(t), whole=True))
        if method == "orpo":  # TRL ORPOTrainer.odds_ratio_loss, beta = lambda = 0.1
            a = lp / n
            log_odds = (a[0::2] - a[1::2]) - (torch.log1p(-torch.exp(a[0::2])) - torch.log1p(-torch.exp(a[1::2])))
            nll = -lw[0::2].sum() / nw[0::2].sum()
            return nll - 0.1 * F.logsigmoid(log_odds).mean()
        if method == "simpo":  # TRL CPOTrainer loss_type simpo, beta 2, gamma_beta_ratio 0.5
            a = lp / n
            return -F.logsigmoid(2.0 * (a[0::2] - a[1::2]) - 1.0).mean()
        d = lp - ref[t]
        h = d[0::2] - d[1::2]
        if method in ("dpo", "dpo+nll"):
            loss = -F.logsigmoid(0.1 * h).mean()
            if method == "dpo+nll":
                loss = loss + 1.0 * (-lp[0::2].sum() / n[0::2].sum())
            return loss
        if method == "hinge":
            return torch.relu(1 - 0.1 * h).mean()
        if method == "ipo":
            dn = d / n
            return ((dn[0::2] - dn[1::2]) - 1 / (2 * 0.1)).pow(2).mean()
        if method == "robust":
            e = 0.1
            return ((-(1 - e) * F.logsigmoid(0.1 * h) + e * F.logsigmoid(-0.1 * h)) / (1 - 2 * e)).mean()
        raise SystemExit(f"unknown method {method}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    times, losses = [], []
    for t in range(1, steps + 1):
        loss = loss_of(t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter())
        losses.append(loss.item())
    print(json.dumps({"steps_per_s": (steps - 1) / (times[-1] - times[0]), "step1_loss": losses[0], "last_loss": losses[-1]}))


def main():
    global BIN
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefpipe", default=BIN, help="the binary (default target/release/prefpipe, built when missing)")
    ap.add_argument("--methods", default="dpo", help=f"comma-separated, of {', '.join(METHODS)}; 'all' for every one")
    ap.add_argument("--torch-worker", nargs=3, metavar=("MODEL", "DATA", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(*args.torch_worker[:2], args.steps, args.batch, args.threads, args.torch_worker[2])
        return
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"--methods: unknown method `{m}` (known: {', '.join(METHODS)})")
    BIN = os.path.abspath(args.prefpipe)
    if BIN == os.path.join(ROOT, "target/release/prefpipe"):
        ensure_binary()
    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "model")
        n_params = build_model(model)
        data = os.path.join(work, "pairs.jsonl")
        with open(data, "w") as f:
            for r in pairs(args.steps * args.batch):
                f.write(json.dumps(r) + "\n")
        load = [os.getloadavg()[0]]
        results = []
        for m in methods:
            ours = run_prefpipe(work, model, data, args, m)
            wall, rss, out = timed([sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--batch", str(args.batch),
                                    "--threads", str(args.threads), "--torch-worker", model, data, m])
            theirs = json.loads(out.strip().splitlines()[-1]) | {"peak_rss_mib": rss, "wall_s": wall}
            results.append((m, ours, theirs))
            load.append(os.getloadavg()[0])
    print(f"model: {n_params / 1e6:.1f}M parameters, f32, CPU, {args.threads} threads; batch {args.batch} pairs, {args.steps} steps")
    print(f"{'method':9} {'':10} {'steps/s':>8} {'step-1 loss':>12} {f'step-{args.steps} loss':>13} {'peak RSS':>12} {'wall':>8}")
    for m, ours, theirs in results:
        for name, r in (("prefpipe", ours), ("pytorch", theirs)):
            print(f"{m:9} {name:10} {r['steps_per_s']:8.3f} {r['step1_loss']:12.6f} {r['last_loss']:13.6f} {r['peak_rss_mib']:8.0f} MiB {r['wall_s']:7.1f}s")
        print(f"{m:9} ratio (prefpipe / pytorch steps/s): {ours['steps_per_s'] / theirs['steps_per_s']:.2f}")
    # Other processes on the machine skew the figures: the 1-minute load average at start and after each method.
    print("load average: " + " → ".join(f"{x:.2f}" for x in load) + f" on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

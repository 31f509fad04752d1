#!/usr/bin/env python3
"""Reference numbers for prefpipe's `train` stage, computed with PyTorch + transformers.

Writes tests/golden/train/:

- pairs.jsonl, lists.jsonl: small preference tables (a pairs table for DPO, a
  lists table for LiPO, one list with tied labels and one whose rewards are all
  equal);
- golden.json: for each case (policy ≠ reference), the step-1 batch loss and
  metrics exactly per DESIGN §8 — the first `batch_size` rows in table order —
  and, after one torch AdamW step (global-norm clipping first) on that loss, the
  step-2 loss on the next rows; plus torch.optim.AdamW and clip_grad_norm_
  trajectories on small tensors.

Sequence log-probs follow DESIGN §4 (one sequence at a time, float32
log_softmax, summed in float64); the losses are computed in float64. Token ids
(`encode_example`), policy and reference alike with the policy's tokenizer (as TRL):

- plain cases: prompt = encode(prompt, add_special_tokens=True), each response =
  encode(response, add_special_tokens=False) + [eos];
- `chat_template: true` cases: the string prompt is the one-turn conversation
  [user: prompt], tokenized as TRL 1.16 `DPOTrainer._prepare_dataset` does a
  conversational example (DESIGN §4/§15): P = `trl.data_utils._tokenize(tok,
  messages, add_generation_prompt=True)`, F = `_tokenize(tok, messages +
  [assistant: response])` (the chat template encoded without special tokens),
  k = `trl.data_utils.common_prefix_length(P, F)`, minimised over the
  example's responses (chosen and rejected; every response of a LiPO list);
  prompt = P[:k], each response = its F[k:]; no EOS is appended (the template's
  end-of-turn tokens end it). For the DPO chat case the script builds a
  `trl.DPOTrainer` on the same pairs and checks that its tokenized dataset has
  exactly these ids and that its `compute_loss` on the first batch (TRL's
  step-1 loss, loss_type sigmoid) equals the step-1 loss here (recorded as
  `step1.trl_loss`).

With --check DIR, it instead loads a checkpoint that prefpipe trained (e.g.
out/train-dpo, written by pipelines/train-dpo.yaml) in transformers and
measures the implicit-reward accuracy on the held-out pairs the pipeline
exported next to it, against the reference; it exits 1 below --min-accuracy.
tests/golden/train/heldout_transformers.jsonl records its output for
pipelines/train-dpo.yaml and train-lipo.yaml (one line each).

Usage (from the repository root; needs torch, transformers, safetensors, trl 1.16):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors trl
    /tmp/venv/bin/python tests/reference/train_golden.py
    for m in dpo lipo; do
        cargo run -- run pipelines/train-$m.yaml
        /tmp/venv/bin/python tests/reference/train_golden.py --check out/train-$m
    done > tests/golden/train/heldout_transformers.jsonl
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile

import datasets
import torch
import transformers
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.data_utils import _tokenize, common_prefix_length

# (prompt, chosen, rejected)
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I don't know."),
    ("Why is the sky blue?", "Rayleigh scattering: shorter wavelengths scatter more.", "Because it is."),
    ("Write a short poem about the sea.", "Waves fold into foam,\nthe tide keeps its promise.", "sea sea sea"),
    ("How do I sort a list in Python?", "Use sorted(xs), or xs.sort() to sort in place.", "You can't."),
    ("Quelle est la capitale de la France ?", "C'est Paris.", "Je pense que c'est Lyon."),
    ("Warum ist der Himmel blau?", "Wegen der Rayleigh-Streuung.", "Keine Ahnung."),
    ("为什么天空是蓝色的？", "因为瑞利散射。", "不知道。"),
    ("Give three reasons to learn a new language.", "Travel, work and new friends.", "There are none."),
]

# (prompt, responses, rewards); row 1 has tied labels, row 4 all-equal rewards (skipped).
LISTS = [
    ("What is the capital of France?", ["Paris.", "The capital is Paris, on the Seine.", "Lyon.", "I don't know."], [2.0, 1.5, -1.0, -3.0]),
    ("Why is the sky blue?", ["Rayleigh scattering.", "Scattering of short wavelengths.", "It just is."], [1.0, 1.0, 0.0]),
    ("Write a short poem about the sea.", ["Waves fold into foam.", "sea sea sea"], [0.7, 0.2]),
    ("How do I sort a list in Python?", ["sorted(xs)", "xs.sort()", "Use a loop.", "You can't.", "Ask someone."], [3.0, 2.5, 1.0, -2.0, -1.0]),
    ("Quelle est la capitale de la France ?", ["Paris.", "C'est Paris."], [1.0, 1.0]),
    ("Warum ist der Himmel blau?", ["Wegen der Rayleigh-Streuung.", "Keine Ahnung.", "Weil Licht gestreut wird."], [2.0, -1.0, 1.5]),
]

# Each case: the first batch's loss (step 1) and, after one AdamW step, the second batch's (step 2).
# The `train` stage gets the same settings (tests/e2e/train.rs, crates/prefpipe-models/tests/train_golden.rs).
CASES = [
    {"name": "dpo-llama", "method": "dpo", "model": "tiny-llama", "reference": "tiny-mistral", "chat_template": False,
     "beta": 0.1, "batch_size": 4},
    {"name": "dpo-qwen2-chat", "method": "dpo", "model": "tiny-qwen2", "reference": "tiny-qwen3", "chat_template": True,
     "beta": 0.5, "batch_size": 3},
    {"name": "lipo-qwen2-chat", "method": "lipo", "model": "tiny-qwen2", "reference": "tiny-qwen3", "chat_template": True,
     "beta": 0.5, "batch_size": 3},
    {"name": "lipo-llama", "method": "lipo", "model": "tiny-llama", "reference": "tiny-mistral", "chat_template": False,
     "beta": 0.1, "batch_size": 2},
]
# The one optimizer step between the two losses.
STEP = {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "max_grad_norm": 1.0}


def encode_response(tok, response):
    return tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]


def encode_example(tok, prompt, responses, chat):
    """(prompt ids, [response ids]) of one example (a pair or a list), DESIGN §4/§15."""
    if not chat:
        return tok(prompt, add_special_tokens=True).input_ids, [encode_response(tok, y) for y in responses]
    # TRL 1.16 DPOTrainer._prepare_dataset, conversational branch.
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = _tokenize(tok, messages, add_generation_prompt=True)["input_ids"]
    full = [_tokenize(tok, messages + [{"role": "assistant", "content": y}])["input_ids"] for y in responses]
    k = min(common_prefix_length(prompt_ids, f) for f in full)
    return prompt_ids[:k], [f[k:] for f in full]


def seq_logp(model, prompt_ids, response_ids):
    """sθ(y): Σ log_softmax at the positions predicting the response (EOS included), one sequence."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(ids).logits[0]
    p, r = len(prompt_ids), len(response_ids)
    logp = torch.log_softmax(logits[p - 1 : p + r - 1].float(), dim=-1).gather(1, torch.tensor(response_ids)[:, None])[:, 0]
    return logp.double().sum()


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def dpo_loss(pol, ref, beta):
    """pol: [(s_chosen, s_rejected)] (tensors), ref: floats. Mean over pairs of −log σ(β·margin)."""
    losses, stats = [], {"pairs": 0, "correct": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0}
    for (pc, pr), (rc, rr) in zip(pol, ref):
        z = beta * ((pc - rc) - (pr - rr))
        losses.append(-torch.nn.functional.logsigmoid(z))
        zv = z.item()
        stats["pairs"] += 1
        # TRL: (chosen_rewards > rejected_rewards).float(), a tie counts 0.
        stats["correct"] += 1.0 if zv > 0 else 0.0
        stats["margin"] += zv
        stats["chosen"] += pc.item()
        stats["rejected"] += pr.item()
    n = len(losses)
    return torch.stack(losses).mean(), {
        "reward_accuracy": stats["correct"] / stats["pairs"],
        "reward_margin": stats["margin"] / n,
        "chosen_logp": stats["chosen"] / n,
        "rejected_logp": stats["rejected"] / n,
    }


def lipo_list_loss(s, psi):
    """LiPO-λ for one list: s (tensor of β·(sθ − s_ref)), psi (floats in [0, 1]); DESIGN §8."""
    k = len(psi)
    sv = s.detach().tolist()
    order = sorted(range(k), key=lambda i: -sv[i])  # Python's sort is stable
    tau = [0] * k
    for pos, i in enumerate(order):
        tau[i] = pos + 1
    gain = [2.0 ** p - 1.0 for p in psi]
    inv_d = [1.0 / math.log(1.0 + t) for t in tau]
    terms, pairs, correct = [], 0, 0.0
    for i in range(k):
        for j in range(k):
            if psi[i] > psi[j]:
                delta = abs(gain[i] - gain[j]) * abs(inv_d[i] - inv_d[j])  # a constant: no gradient
                terms.append(-delta * torch.nn.functional.logsigmoid(s[i] - s[j]))
                d = sv[i] - sv[j]
                pairs += 1
                correct += 1.0 if d > 0 else 0.0  # a tie counts 0, as TRL's accuracies
    return torch.stack(terms).sum(), pairs, correct


def lipo_loss(pol, ref, rewards, beta):
    losses, pairs, correct, margin, chosen, rejected = [], 0, 0.0, 0.0, 0.0, 0.0
    for p, r, rw in zip(pol, ref, rewards):
        lo, hi = min(rw), max(rw)
        if hi == lo:
            continue  # all rewards equal: no preference, skipped
        psi = [(x - lo) / (hi - lo) for x in rw]
        s = beta * (torch.stack(p) - torch.tensor(r, dtype=torch.float64))
        l, n_pairs, n_correct = lipo_list_loss(s, psi)
        losses.append(l)
        pairs += n_pairs
        correct += n_correct
        best, worst = psi.index(1.0), psi.index(0.0)
        margin += (s[best] - s[worst]).item()
        chosen += p[best].item()
        rejected += p[worst].item()
    n = len(losses)
    return torch.stack(losses).mean(), {
        "reward_accuracy": correct / pairs,
        "reward_margin": margin / n,
        "chosen_logp": chosen / n,
        "rejected_logp": rejected / n,
    }


def batch_loss(case, model, tok, ref_logps, rows):
    beta = case["beta"]
    if case["method"] == "dpo":
        pol, ref = [], []
        for i in rows:
            prompt, chosen, rejected = PAIRS[i]
            pids, (c, r) = encode_example(tok, prompt, [chosen, rejected], case["chat_template"])
            pol.append((seq_logp(model, pids, c), seq_logp(model, pids, r)))
            ref.append(ref_logps[i])
        return dpo_loss(pol, ref, beta)
    pol, ref, rewards = [], [], []
    for i in rows:
        prompt, responses, rw = LISTS[i]
        pids, ys = encode_example(tok, prompt, responses, case["chat_template"])
        pol.append([seq_logp(model, pids, y) for y in ys])
        ref.append(ref_logps[i])
        rewards.append(rw)
    return lipo_loss(pol, ref, rewards, beta)


@torch.no_grad()
def reference_logps(case, ref_model, tok):
    out = []
    if case["method"] == "dpo":
        for prompt, chosen, rejected in PAIRS:
            pids, (c, r) = encode_example(tok, prompt, [chosen, rejected], case["chat_template"])
            out.append((seq_logp(ref_model, pids, c).item(), seq_logp(ref_model, pids, r).item()))
    else:
        for prompt, responses, _ in LISTS:
            pids, ys = encode_example(tok, prompt, responses, case["chat_template"])
            out.append([seq_logp(ref_model, pids, y).item() for y in ys])
    return out


def load(models, name):
    path = os.path.join(models, name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def check_against_trl(case, models, tok, loss1):
    """The DPO chat case through trl.DPOTrainer: the same ids, and the same step-1 loss."""
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    b = case["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=case["beta"], loss_type=["sigmoid"], per_device_train_batch_size=b, max_steps=1,
            report_to="none", bf16=False, use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
        )
        trainer = DPOTrainer(model=load(models, case["model"]), ref_model=load(models, case["reference"]), args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        prepared = trainer.train_dataset
        for i, (p, c, r) in enumerate(PAIRS):
            pids, (cids, rids) = encode_example(tok, p, [c, r], True)
            got = {"prompt_ids": pids, "chosen_ids": cids, "rejected_ids": rids}
            for key, v in got.items():
                if prepared[i][key] != v:
                    sys.exit(f"{case['name']} row {i}: {key} differs from DPOTrainer._prepare_dataset: {prepared[i][key]} vs {v}")
        batch = trainer.data_collator([prepared[i] for i in range(b)])
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch).item()
    if abs(trl_loss - loss1) > 1e-5 * abs(loss1):
        sys.exit(f"{case['name']}: step-1 loss {loss1} differs from DPOTrainer.compute_loss {trl_loss}")
    return trl_loss


def run_case(case, models):
    tok = AutoTokenizer.from_pretrained(os.path.join(models, case["model"]))
    policy = load(models, case["model"])
    reference = load(models, case["reference"])
    ref_logps = reference_logps(case, reference, tok)
    b = case["batch_size"]
    loss1, metrics1 = batch_loss(case, policy, tok, ref_logps, range(0, b))
    trl_check = {}
    if case["method"] == "dpo" and case["chat_template"]:
        trl_check = {"trl_loss": check_against_trl(case, models, tok, loss1.item())}
    policy.zero_grad()
    loss1.backward()
    params = [p for p in policy.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, STEP["max_grad_norm"])
    opt = torch.optim.AdamW(params, lr=STEP["lr"], betas=tuple(STEP["betas"]), eps=STEP["eps"], weight_decay=STEP["weight_decay"])
    opt.step()
    with torch.no_grad():
        loss2, metrics2 = batch_loss(case, policy, tok, ref_logps, range(b, 2 * b))
    return case | {
        "step1": {"rows": list(range(0, b)), "loss": loss1.item()} | metrics1 | trl_check,
        "step2": {"rows": list(range(b, 2 * b)), "loss": loss2.item()} | metrics2,
        "reference_logps": ref_logps,
    }


def adamw_golden():
    """torch.optim.AdamW on fixed tensors and gradients (3 steps, weight decay)."""
    p0 = [0.5, -1.25, 2.0, 0.0, 1e-3]
    grads = [[0.1, -0.2, 0.3, 0.0, 1e-4], [-0.05, 0.4, 0.1, 2.0, -1e-4], [0.2, 0.2, -0.6, -1.0, 5.0]]
    cfg = {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float32))
    opt = torch.optim.AdamW([p], lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
    after = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        after.append(p.detach().tolist())
    state = opt.state[p]
    clip_in = [[3.0, -4.0], [12.0]]
    ts = [torch.nn.Parameter(torch.zeros(len(g))) for g in clip_in]
    for t, g in zip(ts, clip_in):
        t.grad = torch.tensor(g)
    norm = torch.nn.utils.clip_grad_norm_(ts, 6.5)
    return {
        "params": p0, "grads": grads, "config": cfg, "after_each_step": after,
        "exp_avg": state["exp_avg"].tolist(), "exp_avg_sq": state["exp_avg_sq"].tolist(),
        "clip": {"grads": clip_in, "max_norm": 6.5, "norm": norm.item(), "clipped": [t.grad.tolist() for t in ts]},
    }


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@torch.no_grad()
def check(args):
    """Implicit-reward accuracy of a prefpipe checkpoint on held-out pairs, in transformers."""
    heldout = args.heldout or os.path.join(os.path.dirname(os.path.abspath(args.check)), os.path.basename(args.check.rstrip("/")) + "-heldout.jsonl")
    rows = [json.loads(l) for l in open(heldout)]
    tok = AutoTokenizer.from_pretrained(args.check)
    policy = AutoModelForCausalLM.from_pretrained(args.check, dtype=torch.float32, attn_implementation="eager").eval()
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32, attn_implementation="eager").eval()
    correct = 0.0
    for r in rows:
        pids, rids = encode_example(tok, r["prompt"], [r["chosen"], r["rejected"]], args.chat_template)
        m = 0.0
        for rid, sign in zip(rids, (1.0, -1.0)):
            m += sign * (seq_logp(policy, pids, rid).item() - seq_logp(reference, pids, rid).item())
        correct += 1.0 if m > 0 else 0.5 if m == 0 else 0.0
    acc = correct / len(rows)
    print(json.dumps({"checkpoint": args.check, "class": type(policy).__name__, "heldout": heldout, "pairs": len(rows),
                      "implicit_reward_accuracy": acc, "transformers": transformers.__version__}))
    if acc < args.min_accuracy:
        sys.exit(f"held-out accuracy {acc:.3f} < {args.min_accuracy}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="data-samples/models")
    ap.add_argument("--out", default="tests/golden/train")
    ap.add_argument("--check", help="a checkpoint directory written by a `train` stage")
    ap.add_argument("--reference", default="data-samples/models/tiny-llama")
    ap.add_argument("--heldout", help="held-out pairs (JSON lines with prompt/chosen/rejected); default <DIR>-heldout.jsonl")
    ap.add_argument("--chat-template", action="store_true")
    ap.add_argument("--min-accuracy", type=float, default=0.9)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    logging.getLogger("trl").setLevel(logging.ERROR)
    if args.check:
        check(args)
        return
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "pairs.jsonl"), [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    write_jsonl(os.path.join(args.out, "lists.jsonl"), [{"prompt": p, "responses": y, "rewards": w} for p, y, w in LISTS])
    doc = {
        "generated_by": "tests/reference/train_golden.py",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__},
        "settings": "float32, CPU, eager attention; sequences one at a time; log_softmax in float32, sums and losses in float64",
        "optimizer_step": STEP,
        "cases": [run_case(c, args.models) for c in CASES],
        "adamw": adamw_golden(),
    }
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for c in doc["cases"]:
        print(f"{c['name']}: step-1 loss {c['step1']['loss']:.6f}, step-2 loss {c['step2']['loss']:.6f}")
    print(f"wrote {args.out}/golden.json, pairs.jsonl, lists.jsonl")


if __name__ == "__main__":
    main()

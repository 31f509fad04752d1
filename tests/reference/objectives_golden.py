#!/usr/bin/env python3
"""Reference numbers for the `train` stage's other objectives, from TRL's own loss code.

Writes tests/golden/objectives/:

- pairs.jsonl: the preference pairs the cases train on;
- golden.json: for each case, the losses of steps 1..4 (each before its
  update) of a run in table order (batch t = rows 2(t-1), 2t-1), with one
  torch.optim.AdamW step (global-norm clipping first) after each, and the
  step-1 metrics TRL logs.

Each loss is computed by TRL 1.16 itself on the batch's token ids:

- `method: dpo` (loss sigmoid | hinge | ipo | robust, nll_weight):
  `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) with `loss_type`
  [<loss>] or [<loss>, "sft"] and `loss_weights` [1, nll_weight], the
  reference model run by TRL (`ref_model`, `precompute_ref_log_probs=False`);
- `method: orpo`: `ORPOTrainer.get_batch_loss_metrics`
  (trl/experimental/orpo/orpo_trainer.py; `beta` is prefpipe's `lambda`);
- `method: simpo`: `CPOTrainer.get_batch_loss_metrics`
  (trl/experimental/cpo/cpo_trainer.py) with `loss_type="simpo"`, `cpo_alpha=0`.

The trainer objects are made with `__new__` and given exactly the attributes
those methods read (the settings above), so no dataset preprocessing runs: the
tokenisation is prefpipe's non-chat one (DESIGN §4): prompt encoded with
special tokens, response encode(add_special_tokens=False) + [eos].

With --heldout BIN, it instead runs pipelines/train-dpo.yaml with its `train`
stage switched to each objective (VARIANTS) using the prefpipe binary BIN, in a
temporary copy, loads each trained checkpoint in transformers and prints one
JSON line per objective: the held-out implicit-reward accuracy (log-ratio to
the reference, as train-dpo.yaml's own check) and the length-averaged log-prob
accuracy (the implicit reward of ORPO and SimPO); it exits 1 below 0.9.
tests/golden/objectives/heldout_transformers.jsonl records that output.

Usage (from the repository root, TRL 1.16 in .venv):

    .venv/bin/python tests/reference/objectives_golden.py
    cargo build --bin prefpipe
    .venv/bin/python tests/reference/objectives_golden.py --heldout target/debug/prefpipe \
        > tests/golden/objectives/heldout_transformers.jsonl
"""

import argparse
import json
import os
import sys
import types
from collections import defaultdict

import torch
import transformers
import trl
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

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

MODEL, REFERENCE = "tiny-llama", "tiny-mistral"
BATCH, STEPS = 2, 4
# prefpipe `train` settings of each case (the Rust test maps them onto TrainOptions).
CASES = [
    {"name": "dpo-sigmoid", "method": "dpo", "loss": "sigmoid", "beta": 0.1},
    {"name": "slic-hinge", "method": "dpo", "loss": "hinge", "beta": 0.1},
    {"name": "ipo", "method": "dpo", "loss": "ipo", "beta": 0.1},
    {"name": "robust", "method": "dpo", "loss": "robust", "beta": 0.1, "label_smoothing": 0.2},
    {"name": "dpo-nll", "method": "dpo", "loss": "sigmoid", "beta": 0.1, "nll_weight": 1.0},
    {"name": "ipo-nll", "method": "dpo", "loss": "ipo", "beta": 0.5, "nll_weight": 0.5},
    {"name": "orpo", "method": "orpo", "lambda": 0.1},
    {"name": "simpo", "method": "simpo", "beta": 2.0, "gamma": 0.5},
]
STEP = {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "max_grad_norm": 1.0}
ACC = Accelerator(cpu=True)


def load(models, name):
    m = AutoModelForCausalLM.from_pretrained(os.path.join(models, name), dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def tokens(tok, rows):
    out = []
    for i in rows:
        p, c, r = PAIRS[i]
        pids = tok(p, add_special_tokens=True).input_ids
        resp = lambda y: tok(y, add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((pids, resp(c), resp(r)))
    return out


def pad(rows, value):
    t = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (t - len(r)) for r in rows])


def dpo_inputs(toks, pad_id):
    seqs = [p + c for p, c, _ in toks] + [p + r for p, _, r in toks]
    comp = [[0] * len(p) + [1] * len(c) for p, c, _ in toks] + [[0] * len(p) + [1] * len(r) for p, _, r in toks]
    return {"input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0), "completion_mask": pad(comp, 0)}


def pair_batch(toks, pad_id):
    b = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        seqs = [t[0] + t[k] for t in toks]
        b[f"{side}_input_ids"] = pad(seqs, pad_id)
        b[f"{side}_attention_mask"] = pad([[1] * len(s) for s in seqs], 0)
        b[f"{side}_labels"] = pad([[-100] * len(t[0]) + t[k] for t in toks], -100)
    return b


def dpo_trainer(case, policy, reference):
    t = DPOTrainer.__new__(DPOTrainer)
    losses = [case["loss"]] + (["sft"] if case.get("nll_weight", 0) > 0 else [])
    t.__dict__.update(
        model=policy, ref_model=reference, accelerator=ACC, beta=case["beta"], loss_types=losses,
        loss_weights=[1.0] + ([case["nll_weight"]] if len(losses) > 1 else []), ld_alpha=None,
        f_divergence_type="reverse_kl", label_smoothing=case.get("label_smoothing", 0.0), use_weighting=False,
        precompute_ref_logps=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    return t


def free_trainer(case, pad_id):
    cls = ORPOTrainer if case["method"] == "orpo" else CPOTrainer
    t = cls.__new__(cls)
    t.__dict__.update(is_encoder_decoder=False, padding_value=pad_id, pad_token_id=pad_id, label_pad_token_id=-100, aux_loss_enabled=False,
                      accelerator=ACC, _stored_metrics=defaultdict(lambda: defaultdict(list)))
    if case["method"] == "orpo":
        t.beta = case["lambda"]
    else:
        t.__dict__.update(beta=case["beta"], simpo_gamma=case["gamma"], label_smoothing=0.0, cpo_alpha=0.0, alpha=0.0,
                          loss_type="simpo")
    return t


def batch_loss(case, trainer, policy, tok, rows, pad_id):
    toks = tokens(tok, rows)
    if case["method"] == "dpo":
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        loss = trainer._compute_loss(policy, dpo_inputs(toks, pad_id), False)
        m = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
        return loss, {"reward_accuracy": m["rewards/accuracies"], "reward_margin": m["rewards/margins"],
                      "chosen_logp": m["logps/chosen"], "rejected_logp": m["logps/rejected"]}
    loss, metrics = trainer.get_batch_loss_metrics(policy, pair_batch(toks, pad_id), train_eval="train")
    out = {"reward_accuracy": float(metrics["rewards/accuracies"]), "reward_margin": float(metrics["rewards/margins"])}
    if case["method"] == "orpo":
        out["nll"] = float(metrics["nll_loss"])
    return loss, out


def run_case(case, models):
    tok = AutoTokenizer.from_pretrained(os.path.join(models, MODEL))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    policy = load(models, MODEL)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    if case["method"] == "dpo":
        reference = load(models, REFERENCE)
        add_fused_lm_head(reference)
        trainer = dpo_trainer(case, policy, reference)
    else:
        trainer = free_trainer(case, pad_id)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=STEP["lr"], betas=tuple(STEP["betas"]), eps=STEP["eps"], weight_decay=STEP["weight_decay"])
    losses, metrics1 = [], None
    for t in range(STEPS):
        loss, metrics = batch_loss(case, trainer, policy, tok, range(BATCH * t, BATCH * (t + 1)), pad_id)
        losses.append(loss.item())
        metrics1 = metrics1 or metrics
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, STEP["max_grad_norm"])
        opt.step()
    return case | {"model": MODEL, "reference": REFERENCE if case["method"] == "dpo" else None, "batch_size": BATCH,
                   "losses": losses, "step1": metrics1}


# `train` settings replacing train-dpo.yaml's `method: dpo` / `beta: 0.1` (as tests/e2e/objectives.rs).
VARIANTS = [
    ("slic", "method: dpo\n    loss: hinge\n    beta: 0.1"),
    ("ipo", "method: dpo\n    loss: ipo\n    beta: 0.1"),
    ("robust", "method: dpo\n    loss: robust\n    label_smoothing: 0.1\n    beta: 0.1"),
    ("dpo-nll", "method: dpo\n    nll_weight: 1.0\n    beta: 0.1"),
    ("orpo", "method: orpo\n    lambda: 1.0"),
    ("simpo", "method: simpo\n    beta: 2.0\n    gamma: 0.5"),
]


@torch.no_grad()
def heldout(args):
    import subprocess
    import tempfile

    root = os.getcwd()
    yaml = open(os.path.join(root, "pipelines/train-dpo.yaml")).read()
    old = "    method: dpo\n    model: policy\n    beta: 0.1\n"
    assert old in yaml
    reference = load(args.models, MODEL)
    worst = 1.0
    for name, settings in VARIANTS:
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(os.path.join(d, "pipelines"))
            os.makedirs(os.path.join(d, "out"))
            os.symlink(os.path.join(root, "data-samples"), os.path.join(d, "data-samples"))
            with open(os.path.join(d, "pipelines/p.yaml"), "w") as f:
                f.write(yaml.replace(old, f"    {settings}\n    model: policy\n"))
            subprocess.run([os.path.abspath(args.heldout), "run", "pipelines/p.yaml"], cwd=d, check=True, capture_output=True)
            ckpt = os.path.join(d, "out/train-dpo")
            tok = AutoTokenizer.from_pretrained(ckpt)
            policy = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
            rows = [json.loads(l) for l in open(os.path.join(d, "out/train-dpo-heldout.jsonl"))]

            def logp(model, pids, rid):
                ids = torch.tensor([pids + rid])
                lp = torch.log_softmax(model(ids).logits[0, len(pids) - 1 : -1].float(), dim=-1)
                return lp.gather(1, torch.tensor(rid)[:, None]).double().sum().item()

            ratio, avg = 0.0, 0.0
            for r in rows:
                pids = tok(r["prompt"], add_special_tokens=True).input_ids
                c = tok(r["chosen"], add_special_tokens=False).input_ids + [tok.eos_token_id]
                j = tok(r["rejected"], add_special_tokens=False).input_ids + [tok.eos_token_id]
                pc, pj = logp(policy, pids, c), logp(policy, pids, j)
                m = (pc - logp(reference, pids, c)) - (pj - logp(reference, pids, j))
                a = pc / len(c) - pj / len(j)
                ratio += 1.0 if m > 0 else 0.5 if m == 0 else 0.0
                avg += 1.0 if a > 0 else 0.5 if a == 0 else 0.0
            ratio, avg = ratio / len(rows), avg / len(rows)
            free = name in ("orpo", "simpo")
            worst = min(worst, avg if free else ratio)
            print(json.dumps({"objective": name, "settings": settings.replace("\n    ", "; "), "class": type(policy).__name__,
                              "pairs": len(rows), "implicit_reward_accuracy": ratio, "length_averaged_logp_accuracy": avg,
                              "transformers": transformers.__version__}), flush=True)
    if worst < 0.9:
        sys.exit(f"held-out accuracy {worst:.3f} < 0.9")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="data-samples/models")
    ap.add_argument("--out", default="tests/golden/objectives")
    ap.add_argument("--heldout", metavar="BIN", help="check each objective's trained checkpoint of train-dpo.yaml in transformers")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if args.heldout:
        heldout(args)
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pairs.jsonl"), "w") as f:
        for p, c, r in PAIRS:
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n")
    doc = {
        "generated_by": "tests/reference/objectives_golden.py",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__},
        "settings": "float32, CPU, eager attention; batch t = rows 2(t-1), 2t-1 in table order; losses[t-1] before step t's update",
        "optimizer_step": STEP,
        "cases": [run_case(c, args.models) for c in CASES],
    }
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for c in doc["cases"]:
        print(c["name"], " ".join(f"{x:.6f}" for x in c["losses"]), c["step1"])


if __name__ == "__main__":
    main()

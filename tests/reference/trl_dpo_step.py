#!/usr/bin/env python3
"""Train one TRL DPOTrainer step, unchanged, on a prefpipe `trl_chat` export (issue 16, acceptance 2).

    .venv/bin/python tests/reference/trl_dpo_step.py out/pairs.parquet data-samples/models/tiny-qwen3-chat
    .venv/bin/python tests/reference/trl_dpo_step.py out/pairs.jsonl MODEL_DIR [--ref REF_DIR] [--beta 0.1]

Loads the file with `datasets` (Parquet, or JSON lines), checks that it is TRL's
conversational preference format (`prompt`, `chosen`, `rejected` lists of
{role, content}), and runs `trl.DPOTrainer` with its defaults except: CPU,
float32 (bf16 off), max_steps=1, report_to none, no checkpoint saved, and
one batch of up to --batch-size pairs. Without --ref, TRL makes the reference
itself (a frozen copy of the policy), so the step-1 loss is ln 2. Prints the
loss and exits 0; any TRL error exits non-zero.
"""

import argparse
import logging
import math
import sys
import tempfile

import datasets
import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.data_utils import is_conversational


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="a trl_chat export: .parquet or .jsonl")
    ap.add_argument("model", help="the policy: a Hugging Face model directory")
    ap.add_argument("--ref", help="the reference model directory (default: TRL's copy of the policy)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    logging.getLogger("trl").setLevel(logging.ERROR)

    kind = "json" if args.data.endswith((".jsonl", ".json")) else "parquet"
    ds = datasets.load_dataset(kind, data_files=args.data, split="train")
    for col in ("prompt", "chosen", "rejected"):
        if col not in ds.column_names:
            sys.exit(f"{args.data}: no column `{col}` (has {ds.column_names})")
    if not is_conversational(ds[0]):
        sys.exit(f"{args.data}: not TRL's conversational format: {ds[0]['prompt']!r}")

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.ref, dtype=torch.float32) if args.ref else None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(
            output_dir=tmp, beta=args.beta, per_device_train_batch_size=min(args.batch_size, len(ds)), max_steps=1,
            report_to="none", bf16=False, use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
        )
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok)
        out = trainer.train()
    loss = out.training_loss
    if not math.isfinite(loss):
        sys.exit(f"non-finite loss {loss}")
    turns = max(len(p) for p in ds["prompt"])
    print(f"trl {trl.__version__}: {len(ds)} pairs, prompts of up to {turns} messages; step-1 loss {loss:.6f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference reward-model scores for the `score` stage, computed with Hugging Face transformers.

For each reward model below, scores the (prompt, response) pairs of
tests/reference/models_golden.py (20 pairs: several scripts, an empty response,
sequences up to ~200 tokens) with AutoModelForSequenceClassification (float32,
CPU, eager attention), in the two ways DESIGN §4 lets a reward model read them:

- `plain` (no template): prompt_ids ⊕ response_ids, prompt_ids =
  encode(prompt, add_special_tokens=True), response_ids = encode(response,
  add_special_tokens=False) + [eos] (each pair's top-level `response_ids`);
- `chat` (`chat_template: true`): the model's own chat template over the whole
  conversation [user: prompt, assistant: response], add_generation_prompt=False,
  encoded without special tokens (`text`, `ids`) — as the Skywork-Reward and
  ArmoRM model cards feed a reward model; models_golden.py `encode_reward_chat`
  computes it and checks it against TRL's `trl.data_utils._tokenize` and the
  Skywork card's "strip the BOS, encode with special tokens". No EOS is appended:
  the template's end-of-turn tokens end the sequence.

and writes tests/golden/score/<name>.json with, per mode:

- `logits`: the head's output (all labels) at the last token, one sequence at a
  time (no padding; transformers' pooling reads the last token that is not
  pad_token_id, so with pad = eos a trailing EOS is skipped);
- `batched_logits`: the same 20 sequences as one right-padded batch with an
  attention mask, checked here to agree with `logits` (padding must not leak).

tiny-llama-rm's rewards are already in tests/golden/models/tiny-llama-rm.json
(models_golden.py) and are not repeated here.

Models:
- data-samples/models/tiny-qwen2-rm, tiny-mistral-rm: Qwen2/MistralForSequenceClassification,
  1 label, written by prefpipe_models::write_reward_fixture (Qwen2 seed 6, Mistral seed 7:
  crates/prefpipe-stages/tests/score.rs, `committed_rm_fixtures_are_reproducible`).
  tiny-mistral-rm has a 48-token sliding window, which the longer pairs exceed.
- data-samples/models/tiny-qwen3-rm-3labels: Qwen3ForSequenceClassification with
  3 labels (helpfulness, correctness, verbosity) and pad_token_id = eos, written
  by this script with --write-fixtures: the body of data-samples/models/tiny-qwen3
  and a score head drawn from torch.manual_seed(0), saved by transformers
  (5.x-style config.json).

Usage (from the repository root; needs torch, transformers, safetensors, trl 1.16):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors trl
    /tmp/venv/bin/python tests/reference/score_golden.py [--write-fixtures]
"""

import argparse
import json
import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models_golden import PAIRS, encode_prompt, encode_response, encode_reward_chat, header  # noqa: E402

REWARD = ["tiny-qwen2-rm", "tiny-mistral-rm", "tiny-qwen3-rm-3labels"]
LABELS = ["helpfulness", "correctness", "verbosity"]


def write_three_label_fixture(models):
    src = os.path.join(models, "tiny-qwen3")
    out = os.path.join(models, "tiny-qwen3-rm-3labels")
    cfg = Qwen3Config.from_pretrained(src)
    cfg.architectures = ["Qwen3ForSequenceClassification"]
    cfg.num_labels = len(LABELS)
    cfg.id2label = dict(enumerate(LABELS))
    cfg.label2id = {l: i for i, l in enumerate(LABELS)}
    # pad == eos, as in many released reward models: the score is read before the trailing EOS.
    cfg.pad_token_id = cfg.eos_token_id
    torch.manual_seed(0)
    rm = Qwen3ForSequenceClassification(cfg).eval()
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rm.model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 0.5)
    shutil.rmtree(out, ignore_errors=True)
    rm.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), out)
    print(f"wrote {out}")


@torch.no_grad()
def run_reward(name, models):
    path = os.path.join(models, name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    pad = model.config.pad_token_id
    doc = header(None) | {
        "generated_by": "tests/reference/score_golden.py",
        "model": f"data-samples/models/{name}",
        "class": type(model).__name__,
        "num_labels": model.config.num_labels,
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "pad_token_id": pad,
        "eos_token_id": tok.eos_token_id,
    }
    items = [{"prompt": p, "response": r, "response_ids": encode_response(tok, r)} for p, r in PAIRS]
    for mode in ("plain", "chat"):
        seqs = []
        for item in items:
            if mode == "plain":
                pids = encode_prompt(tok, item["prompt"], False)
                ids = pids + item["response_ids"]
                item[mode] = {"prompt_ids": pids}
            else:
                text, ids = encode_reward_chat(tok, item["prompt"], item["response"])
                item[mode] = {"text": text, "ids": ids}
            seqs.append(ids)
            item[mode]["logits"] = model(torch.tensor([ids])).logits[0].tolist()
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        batched = model(ids, attention_mask=mask).logits.tolist()
        for item, b in zip(items, batched):
            item[mode]["batched_logits"] = b
            worst = max(abs(x - y) for x, y in zip(b, item[mode]["logits"]))
            if worst > 1e-5:
                sys.exit(f"{name} {mode}: transformers' batched and unbatched scores differ by {worst}")
    doc["pairs"] = items
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="data-samples/models")
    ap.add_argument("--out", default="tests/golden/score")
    ap.add_argument("--write-fixtures", action="store_true", help="(re)write tiny-qwen3-rm-3labels first")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.write_fixtures:
        write_three_label_fixture(args.models)
    os.makedirs(args.out, exist_ok=True)
    for name in REWARD:
        doc = run_reward(name, args.models)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {args.out}/{name}.json")


if __name__ == "__main__":
    main()

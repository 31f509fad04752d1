#!/usr/bin/env python3
"""Reference numbers for conversations (DESIGN §4, §15; issue 16), computed by TRL and transformers.

For each tiny family with a real chat template (made by tests/reference/chat_fixtures.py):

    llama31  data-samples/models/tiny-llama31-chat{,-ref,-rm}   Llama-3.1-8B-Instruct template
    qwen25   data-samples/models/tiny-qwen25-chat{,-ref,-rm}    Qwen2.5-7B-Instruct template
    qwen3    data-samples/models/tiny-qwen3-chat{,-ref,-rm}     Qwen3-0.6B template

it writes tests/golden/chat/<family>.json with, per example (multi-turn
conversations with a system prompt, one without, and one plain string prompt,
which prefpipe treats as the one-turn conversation [user: prompt]):

- the prompt text and ids: `tokenizer.apply_chat_template(messages,
  add_generation_prompt=True)`, encoded without special tokens — exactly TRL's
  `trl.data_utils._tokenize(tok, prompt, add_generation_prompt=True)`;
- per response: the full conversation (messages + [assistant: response])
  rendered and encoded the same way, and the response ids = the full ids from
  the common prefix length k with the prompt ids (`trl.data_utils.
  common_prefix_length`); no EOS is appended. For the pair, k is the smaller of
  chosen's and rejected's: the `trl` entry is `DPOTrainer._prepare_dataset`'s
  own output (`prompt_ids`, `chosen_ids`, `rejected_ids`, read back from
  `trainer.train_dataset`), and the script checks that the hand-computed ids
  equal it;
- summed log-probs of each response under the policy and the reference
  (transformers, float32, eager attention, CPU; log_softmax in float32, sums in
  float64) on prompt_ids[:k] + response_ids;
- the reward, as the Skywork-Reward and ArmoRM model cards compute it: the
  reward model's own template over the whole conversation (… user, assistant),
  add_generation_prompt=False, encoded without special tokens (the script checks
  that Skywork-Reward-V2's "strip the BOS from the text, then encode with special
  tokens" gives the same ids), reward = the score head's output at the last token;
- the DPO loss: `DPOTrainer.compute_loss` (TRL 1.16, loss_type sigmoid,
  beta 0.1) on one batch holding every example of the file, in order, collated
  by the trainer's own collator, with the `-ref` fixture as `ref_model` (the
  policy's weights plus seeded noise, so the log-ratios are not 0 and the loss
  is not the trivial ln 2). That is the loss TRL logs for step 1 (before the
  optimizer update). Per-pair losses −log σ(β·h) from the log-probs above are
  written too, and their mean is checked against TRL's.

Usage (from the repository root):

    .venv/bin/python tests/reference/chat_fixtures.py   # only when the fixtures change
    .venv/bin/python tests/reference/chat_golden.py
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile

import datasets
import tokenizers
import torch
import transformers
import trl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.data_utils import _tokenize, common_prefix_length, is_conversational

MODELS = "data-samples/models"
OUT = "tests/golden/chat"
BETA = 0.1

FAMILIES = {
    "llama31": "trl/chat_templates/llama3_1.jinja (byte-identical to llama.cpp models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja)",
    "qwen25": "trl/chat_templates/qwen2_5.jinja (byte-identical to llama.cpp models/templates/Qwen-Qwen2.5-7B-Instruct.jinja)",
    "qwen3": "trl/chat_templates/qwen3.jinja (Qwen3-0.6B's template; llama.cpp's Qwen-Qwen3-0.6B.jinja is an earlier revision that renders string contents identically)",
}

SYSTEM = "You are a concise assistant. Answer in one sentence."

# name, messages (the prompt, after system_prompt / strip_trailing_assistant), chosen, rejected.
# `string_prompt` examples are a plain `prompt` string read with chat_template: true.
EXAMPLES = [
    {
        "name": "system_and_history",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Germany?"},
        ],
        "chosen": "The capital of Germany is Berlin.",
        "rejected": "I think it is Munich.",
    },
    {
        "name": "system_three_turns_whitespace",
        # Llama-3.1's template trims every content; Qwen's keep it as is.
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Give me a number."},
            {"role": "assistant", "content": "  7\n"},
            {"role": "user", "content": "Another one, please."},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": "Now add them.\n"},
        ],
        "chosen": "7 + 42 = 49.",
        "rejected": "\n7 + 42 = 48.  ",
    },
    {
        "name": "system_multilingual",
        "messages": [
            {"role": "system", "content": "Réponds en français, brièvement."},
            {"role": "user", "content": "Pourquoi le ciel est-il bleu ?"},
        ],
        "chosen": "À cause de la diffusion de Rayleigh.",
        "rejected": "为什么？我不知道 🤷",
    },
    {
        "name": "history_think_block",
        # Qwen3 renders a response's <think> block as reasoning and drops it from earlier turns.
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Is 91 prime?"},
            {"role": "assistant", "content": "<think>\n91 = 7 * 13.\n</think>\n\nNo, 91 = 7 × 13."},
            {"role": "user", "content": "Is 97 prime?"},
        ],
        "chosen": "<think>\nNo divisor up to 9 works.\n</think>\n\nYes, 97 is prime.",
        "rejected": "No.",
    },
    {
        "name": "no_system",
        # The templates' defaults: Llama-3.1 always writes a system block, Qwen2.5 adds its default system turn.
        "messages": [
            {"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "Waves fold into foam."},
            {"role": "user", "content": "Shorter."},
        ],
        "chosen": "Foam.",
        "rejected": "The sea is a large body of salt water that covers most of the Earth.",
    },
    {
        "name": "string_prompt",
        "string_prompt": "How do I sort a list in Python?",
        "chosen": "Use sorted(xs), or xs.sort() to sort in place.",
        "rejected": "def sort(xs):\n    return xs\n",
    },
]


def messages_of(ex):
    if "string_prompt" in ex:
        return [{"role": "user", "content": ex["string_prompt"]}]
    return ex["messages"]


def canonical_json(messages):
    """DESIGN §15: {"role", "content"} objects in that key order, no whitespace (prompt_id = blake3 of it)."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False, separators=(",", ":"))


def header():
    return {
        "generated_by": "tests/reference/chat_golden.py",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
        },
        "settings": "float32, CPU, attn_implementation=eager; log_softmax in float32, sums in float64",
    }


def check_tokenizer(tok, raw, texts):
    """AutoTokenizer and tokenizer.json-as-is (PreTrainedTokenizerFast) must agree."""
    for t in texts:
        a, b = tok(t, add_special_tokens=False).input_ids, raw(t, add_special_tokens=False).input_ids
        if a != b:
            sys.exit(f"{type(tok).__name__} and PreTrainedTokenizerFast disagree on {t!r}: {a} vs {b}")


@torch.no_grad()
def response_logp(model, prompt_ids, response_ids):
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(ids).logits[0]
    p, r = len(prompt_ids), len(response_ids)
    pred = logits[p - 1 : p + r - 1]
    logp = torch.log_softmax(pred.float(), dim=-1).gather(1, torch.tensor(response_ids)[:, None])[:, 0]
    return logp.double().sum().item()


@torch.no_grad()
def reward(rm, rm_tok, conversation):
    text = rm_tok.apply_chat_template(conversation, tokenize=False)
    ids = rm_tok(text, add_special_tokens=False).input_ids
    # Skywork-Reward-V2's model card: drop a leading BOS from the text, then encode with special tokens.
    card = text[len(rm_tok.bos_token) :] if rm_tok.bos_token and text.startswith(rm_tok.bos_token) else text
    if rm_tok(card).input_ids != ids:
        sys.exit(f"the model-card encoding differs from DESIGN §4's for {conversation!r}")
    if rm_tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"] != ids:
        sys.exit("ArmoRM's encoding (apply_chat_template(tokenize=True)) differs")
    score = rm(torch.tensor([ids])).logits[0, 0].item()
    return text, ids, score


def run_family(family, models):
    policy_dir = os.path.join(models, f"tiny-{family}-chat")
    tok = AutoTokenizer.from_pretrained(policy_dir)
    raw = PreTrainedTokenizerFast.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref = AutoModelForCausalLM.from_pretrained(policy_dir + "-ref", dtype=torch.float32, attn_implementation="eager").eval()
    rm_tok = AutoTokenizer.from_pretrained(policy_dir + "-rm")
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir + "-rm", dtype=torch.float32, attn_implementation="eager").eval()

    # TRL's conversational preference format — what prefpipe's `trl_chat` export writes.
    rows = [
        {
            "prompt": messages_of(ex),
            "chosen": [{"role": "assistant", "content": ex["chosen"]}],
            "rejected": [{"role": "assistant", "content": ex["rejected"]}],
        }
        for ex in EXAMPLES
    ]
    assert all(is_conversational(r) for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=BETA, loss_type=["sigmoid"], per_device_train_batch_size=len(rows), max_steps=1,
            report_to="none", bf16=False, use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
        )
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        prepared = trainer.train_dataset
        batch = trainer.data_collator([prepared[i] for i in range(len(rows))])
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch).item()

    doc = header() | {
        "family": family,
        "chat_template": FAMILIES[family],
        "policy": f"{MODELS}/tiny-{family}-chat",
        "reference": f"{MODELS}/tiny-{family}-chat-ref",
        "reward_model": f"{MODELS}/tiny-{family}-chat-rm",
        "special_tokens": {"bos": tok.bos_token, "eos": tok.eos_token, "eos_id": tok.eos_token_id, "pad": tok.pad_token},
        "beta": BETA,
    }
    items, per_pair = [], []
    for ex, prep in zip(EXAMPLES, prepared):
        msgs = messages_of(ex)
        prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt_text, add_special_tokens=False).input_ids
        assert prompt_ids == _tokenize(tok, msgs, add_generation_prompt=True)["input_ids"]
        item = {"name": ex["name"]}
        if "string_prompt" in ex:
            item["string_prompt"] = ex["string_prompt"]
        item |= {"messages": msgs, "canonical_json": canonical_json(msgs), "prompt_text": prompt_text, "prompt_ids": prompt_ids}
        check_tokenizer(tok, raw, [prompt_text])
        full_ids = {}
        for side in ("chosen", "rejected"):
            conv = msgs + [{"role": "assistant", "content": ex[side]}]
            full_text = tok.apply_chat_template(conv, tokenize=False)
            ids = tok(full_text, add_special_tokens=False).input_ids
            check_tokenizer(tok, raw, [full_text])
            k = common_prefix_length(prompt_ids, ids)
            rm_text, rm_ids, score = reward(rm, rm_tok, conv)
            full_ids[side] = ids
            item[side] = {
                "text": ex[side],
                "full_text": full_text,
                "full_ids": ids,
                "prefix_len": k,
                "response_ids": ids[k:],
                "n_tokens": len(ids) - k,
                "logp_policy": response_logp(policy, prompt_ids[:k], ids[k:]),
                "logp_reference": response_logp(ref, prompt_ids[:k], ids[k:]),
                "rm_text": rm_text,
                "rm_ids": rm_ids,
                "reward": score,
            }
        k = min(item["chosen"]["prefix_len"], item["rejected"]["prefix_len"])
        trl_ids = {"prompt_ids": prompt_ids[:k], "chosen_ids": full_ids["chosen"][k:], "rejected_ids": full_ids["rejected"][k:]}
        for key, v in trl_ids.items():
            if prep[key] != v:
                sys.exit(f"{family}/{ex['name']}: {key} differs from DPOTrainer._prepare_dataset: {prep[key]} vs {v}")
        item["trl"] = trl_ids | {"prefix_len": k}
        lp = {s: response_logp(policy, trl_ids["prompt_ids"], trl_ids[f"{s}_ids"]) for s in ("chosen", "rejected")}
        lr = {s: response_logp(ref, trl_ids["prompt_ids"], trl_ids[f"{s}_ids"]) for s in ("chosen", "rejected")}
        h = (lp["chosen"] - lr["chosen"]) - (lp["rejected"] - lr["rejected"])
        loss = -math.log(1.0 / (1.0 + math.exp(-BETA * h)))
        item["dpo"] = {"chosen_logps": lp["chosen"], "rejected_logps": lp["rejected"], "ref_chosen_logps": lr["chosen"],
                       "ref_rejected_logps": lr["rejected"], "loss": loss}
        per_pair.append(loss)
        items.append(item)
    mean = sum(per_pair) / len(per_pair)
    if abs(mean - trl_loss) > 1e-5 * max(1.0, abs(trl_loss)):
        sys.exit(f"{family}: the mean per-pair loss {mean} differs from DPOTrainer.compute_loss {trl_loss}")
    doc["examples"] = items
    doc["dpo_step1"] = {
        "loss": trl_loss,
        "how": "trl.DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(beta=0.1, loss_type=['sigmoid'], bf16=False, use_cpu=True)).compute_loss on one batch of every example in file order (its own collator); = mean of examples[].dpo.loss",
    }
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    logging.getLogger("trl").setLevel(logging.ERROR)
    os.makedirs(args.out, exist_ok=True)
    for family in FAMILIES:
        doc = run_family(family, args.models)
        path = os.path.join(args.out, f"{family}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {path}: DPO step-1 loss {doc['dpo_step1']['loss']:.6f}")


if __name__ == "__main__":
    main()

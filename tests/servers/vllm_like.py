#!/usr/bin/env python3
"""A small server with vLLM's request/response shapes, computed with transformers.

Not vLLM: one process, one request at a time on the model (a lock), float32 on
CPU, ``torch.set_num_threads(1)``. It exists so the remote backends can be
tested against vLLM's wire format and checked to the last digit against a
direct transformers computation.

Shapes follow vLLM's sources (git snapshot of ``vllm-project/vllm`` main,
2026; see /work/shared/WIRE.md §1):

- ``/v1/completions``: ``vllm/entrypoints/openai/completion/protocol.py``
  (``CompletionRequest``: ``prompt: list[int] | list[list[int]] | str | list[str]``,
  ``echo``, ``logprobs: int``, ``prompt_logprobs: int``, ``max_tokens`` default
  16, ``add_special_tokens`` default True, ``return_token_ids``; echo without
  explicit ``prompt_logprobs`` sets ``prompt_logprobs = logprobs``; echo with
  ``max_tokens == 0`` runs with ``max_tokens = 1`` internally) and
  ``.../completion/serving.py`` @cc139d8e (``request_output_to_completion_response``:
  with echo and ``max_tokens == 0`` the answer holds only the prompt tokens and
  their logprobs; ``_create_completion_logprobs``: legacy ``text_offset /
  token_logprobs / tokens / top_logprobs``, first position ``null``, the actual
  token's logprob always present, clamped to >= -9999.0, ``top_logprobs`` keyed
  by decoded string holding the actual token then the top k).
  ``prompt_logprobs`` on each choice: ``[null, {"<token id>": {"logprob",
  "rank", "decoded_token"}}, ...]`` (actual token first, then the top k;
  ``rank`` is 1 + the number of tokens with a higher logprob).
  ``prompt_token_ids`` / ``token_ids`` are returned only with
  ``return_token_ids: true``, as in vLLM.
- ``/classify`` (server root, not /v1): ``docs/models/pooling_models/classify.md``
  @27c627ba, ``vllm/entrypoints/pooling/classify/{protocol,serving}.py``
  @dff4cad3/@81ab2d3b and ``vllm/entrypoints/pooling/base/protocol.py`` @020638a6
  (``input: list[int] | list[list[int]] | str | list[str]`` with
  ``add_special_tokens`` default True, or ``messages`` with
  ``add_generation_prompt``/``add_special_tokens`` default False;
  ``use_activation: bool | None``; ``normalize`` is rejected). Response
  ``{"id":"classify-…","object":"list","created","model","data":[{"index",
  "label": id2label[argmax(probs)],"probs","num_classes"}],"usage":{"prompt_tokens",
  "total_tokens","completion_tokens":0,"prompt_tokens_details":null}}``.
  Activation (``vllm/model_executor/layers/pooler/activations.py`` @1c713679):
  ``problem_type`` regression → none, multi_label → sigmoid, otherwise sigmoid
  when num_labels < 2 else softmax. ``use_activation: false`` → raw head output.
  The older spellings ``activation`` (vLLM ≈0.10–0.11) and ``softmax`` (≈0.9)
  are accepted here as aliases of ``use_activation`` (upstream removed them:
  classify.md "Remove softmax from PoolingParams"); ``use_activation`` wins
  when several are given.
- Errors: ``{"error":{"message","type":"BadRequestError"|"NotFoundError",
  "param","code":<HTTP status>}}`` (``ErrorInfo`` in
  ``vllm/entrypoints/openai/engine/protocol.py``); a wrong ``model`` is 404
  "The model `x` does not exist."; a prompt longer than the context gives
  400 "You passed N input tokens and requested M output tokens. However, the
  model's context length is only L tokens, resulting in a maximum input length
  of L-M tokens. Please reduce the length of the input prompt." (param
  ``input_tokens``; ``vllm/renderers/params.py`` @1aa021e8, ``_token_len_check``).
  Note: vLLM sends no ``context_length_exceeded`` code.
- ``/v1/models``: ``ModelCard`` ``{"id","object":"model","created","owned_by":"vllm",
  "root": <the model directory>,"parent":null,"max_model_len","permission":[]}``.
- ``/v1/chat/completions`` (policy): chat template with
  ``add_generation_prompt`` (default True), ``n``, ``seed`` (choice i uses
  seed + i, as vLLM V1's parallel sampling), ``temperature``/``top_p``/``top_k``,
  ``logprobs``/``top_logprobs``, vLLM's top-level ``prompt_logprobs``.

Numbers: ``model.eval()``, ``torch.no_grad()``, float32, eager attention, one
sequence per forward (no padding). ``token_logprobs[i]`` =
``log_softmax(logits[i-1])[token[i]]`` (float32). Logprobs are raw (before
temperature), vLLM V1's default ``raw_logprobs``. Sampling draws from a
``torch.Generator`` seeded with the request seed; it is deterministic here but
of course not vLLM's sample.

Scores: by default the head output at the position transformers'
``*ForSequenceClassification`` pools (the last token that is not
``pad_token_id``). Real vLLM pools the LAST token whatever its id; the two
differ for a reward model whose pad id equals EOS when the input ends with
EOS. ``--pooling last`` gives vLLM's behaviour.

    .venv/bin/python tests/servers/vllm_like.py --policy data-samples/models/tiny-llama \
        --reward data-samples/models/tiny-llama-rm --served-name tiny
"""

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

torch.set_num_threads(1)
MIN_LOGPROB = -9999.0


class ApiError(Exception):
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self):
        kind = {400: "BadRequestError", 404: "NotFoundError", 501: "NotImplementedError"}.get(self.status, "InternalServerError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def bad(message, param=None):
    return ApiError(400, message, param)


def finite(x):
    return x if math.isfinite(x) else MIN_LOGPROB


class Backend:
    def __init__(self, a):
        self.a = a
        self.lock = threading.Lock()
        self.name = a.served_name
        self.policy = self.policy_tok = self.reward = self.reward_tok = None
        if a.policy:
            self.policy_tok = AutoTokenizer.from_pretrained(a.policy)
            self.policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32, attn_implementation="eager").eval()
            self.gen_defaults = self.generation_defaults(a.policy)
        if a.reward:
            self.reward_tok = AutoTokenizer.from_pretrained(a.reward)
            self.reward = AutoModelForSequenceClassification.from_pretrained(a.reward, dtype=torch.float32, attn_implementation="eager").eval()
        main = self.policy if self.policy is not None else self.reward
        self.max_model_len = a.max_model_len or getattr(main.config, "max_position_embeddings", 2048)
        self.root = os.path.abspath(a.policy or a.reward)

    @staticmethod
    def generation_defaults(path):
        """vLLM's default ``--generation-config auto``: sampling defaults from generation_config.json."""
        try:
            with open(os.path.join(path, "generation_config.json")) as f:
                g = json.load(f)
        except OSError:
            return {}
        return {k: g[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in g}

    # ---- helpers -----------------------------------------------------
    def check_model(self, body):
        m = body.get("model")
        if m is not None and m != self.name:
            raise ApiError(404, f"The model `{m}` does not exist.", "model")

    def check_len(self, ids, max_tokens):
        limit = self.max_model_len - max_tokens
        if len(ids) > limit:
            raise bad(
                f"You passed {len(ids)} input tokens and requested {max_tokens} output tokens. "
                f"However, the model's context length is only {self.max_model_len} tokens, resulting in a maximum "
                f"input length of {limit} tokens. Please reduce the length of the input prompt.",
                "input_tokens",
            )

    @staticmethod
    def prompts_of(value, tok, add_special_tokens, field):
        """str | list[str] | list[int] | list[list[int]] -> list of token-id lists."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise bad(f"`{field}` must be a string, a list of strings, or token ids", field)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [list(value)]
        out = []
        for v in value:
            if isinstance(v, str):
                out.append(tok(v, add_special_tokens=add_special_tokens)["input_ids"])
            elif isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                out.append(list(v))
            else:
                raise bad(f"`{field}` must be a string, a list of strings, or token ids", field)
        vocab = len(tok)
        for ids in out:
            if any(t < 0 or t >= vocab for t in ids):
                raise bad(f"Token id out of vocabulary (size {vocab})", field)
        return out

    def decode(self, tok, i):
        return tok.decode([i])

    def step_dict(self, tok, lps, actual, k):
        """vLLM's per-position logprob dict: the actual token first, then the top k (by rank)."""
        lp = lps[actual].item()
        rank = int((lps > lps[actual]).sum().item()) + 1
        d = {actual: (lp, rank)}
        if k is not None and k != 0:
            kk = lps.shape[0] if k < 0 else min(k, lps.shape[0])
            vals, idx = torch.topk(lps, kk)
            for r, (v, i) in enumerate(zip(vals.tolist(), idx.tolist()), start=1):
                d.setdefault(i, (v, r))
        return d

    @staticmethod
    def prompt_logprobs_json(tok, dicts, decode):
        out = []
        for d in dicts:
            if d is None:
                out.append(None)
            else:
                out.append({str(i): {"logprob": finite(lp), "rank": r, "decoded_token": decode(tok, i)} for i, (lp, r) in d.items()})
        return out

    @staticmethod
    def legacy_logprobs(tok, token_ids, dicts, k, decode):
        text_offset, token_logprobs, tokens, top = [], [], [], []
        last_len = 0
        for tid, d in zip(token_ids, dicts):
            if d is None:
                token = decode(tok, tid)
                token_logprobs.append(None)
                top.append(None)
            else:
                token = decode(tok, tid)
                token_logprobs.append(max(d[tid][0], MIN_LOGPROB))
                step = {}
                for n, (i, (lp, _)) in enumerate(d.items()):
                    if k >= n:  # the actual token plus k more, as vLLM
                        step[decode(tok, i)] = max(lp, MIN_LOGPROB)
                top.append(step)
            text_offset.append(0 if not text_offset else text_offset[-1] + last_len)
            last_len = len(token)
            tokens.append(token)
        return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}

    @torch.no_grad()
    def prompt_dicts(self, ids, k):
        """[None, dict for position 1, ...]: log_softmax(logits[i-1]) at token i, float32."""
        logits = self.policy(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
        lps = torch.log_softmax(logits.float(), dim=-1)
        return [None] + [self.step_dict(self.policy_tok, lps[i - 1], ids[i], k) for i in range(1, len(ids))]

    def sampling(self, body, defaults):
        d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0} | defaults
        out = {}
        for key in ("temperature", "top_p", "top_k"):
            v = body.get(key)
            out[key] = d[key] if v is None else v
        if out["top_k"] in (None, -1):
            out["top_k"] = 0
        return out

    @torch.no_grad()
    def generate(self, ids, max_tokens, params, seed, k, ignore_eos=False):
        """-> (generated ids, per-token logprob dicts, finish_reason). Raw logprobs, sampled with seed."""
        tok = self.policy_tok
        eos = self.policy.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        out, dicts = [], []
        past = None
        cur = torch.tensor([ids])
        for _ in range(max_tokens):
            res = self.policy(cur, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float()
            lps = torch.log_softmax(logits, dim=-1)
            t = params["temperature"]
            if t < 1e-5:
                nxt = int(torch.argmax(logits).item())
            else:
                z = logits / t
                if params["top_k"] and params["top_k"] > 0:
                    kth = torch.topk(z, min(params["top_k"], z.shape[0])).values[-1]
                    z = torch.where(z < kth, torch.full_like(z, -float("inf")), z)
                if params["top_p"] < 1.0:
                    sz, si = torch.sort(z, descending=True)
                    cum = torch.cumsum(torch.softmax(sz, -1), -1)
                    drop = cum - torch.softmax(sz, -1) > params["top_p"]
                    sz[drop] = -float("inf")
                    z = torch.full_like(z, -float("inf")).scatter(0, si, sz)
                nxt = int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen).item())
            out.append(nxt)
            dicts.append(self.step_dict(tok, lps, nxt, k))
            if nxt in eos and not ignore_eos:
                return out, dicts, "stop"
            cur = torch.tensor([[nxt]])
        return out, dicts, "length"

    # ---- endpoints ---------------------------------------------------
    def models(self):
        return {"object": "list", "data": [{
            "id": self.name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": self.root, "parent": None, "max_model_len": self.max_model_len,
            "permission": [],
        }]}

    def completions(self, body):
        if self.policy is None:
            raise ApiError(404, "The model does not support Completions API", None)
        self.check_model(body)
        if body.get("stream"):
            raise bad("streaming is not supported by this test server", "stream")
        echo = bool(body.get("echo"))
        logprobs = body.get("logprobs")
        prompt_logprobs = body.get("prompt_logprobs")
        if prompt_logprobs is not None and prompt_logprobs < 0 and prompt_logprobs != -1:
            raise bad("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs")
        if logprobs is not None and logprobs < 0:
            raise bad("`logprobs` must be a positive value.", "logprobs")
        if prompt_logprobs is None and echo:
            prompt_logprobs = logprobs
        max_tokens = body.get("max_tokens", 16)
        if max_tokens is None:
            max_tokens = 16
        echo_only = echo and max_tokens == 0
        if max_tokens < 0 or (max_tokens == 0 and not echo):
            raise bad(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        n = body.get("n") or 1
        seed = body.get("seed")
        tok = self.policy_tok
        prompts = self.prompts_of(body.get("prompt"), tok, body.get("add_special_tokens", True), "prompt")
        params = self.sampling(body, self.gen_defaults)
        choices, n_prompt, n_gen = [], 0, 0
        want_ids = bool(body.get("return_token_ids"))
        for ids in prompts:
            self.check_len(ids, max_tokens)
            pdicts = self.prompt_dicts(ids, prompt_logprobs) if prompt_logprobs is not None else None
            for i in range(n):
                gen_ids, gdicts, finish = self.generate(
                    ids, 1 if echo_only else max_tokens, params, None if seed is None else seed + i,
                    logprobs, bool(body.get("ignore_eos")))
                if echo_only:
                    token_ids, dicts, text = ids, pdicts, tok.decode(ids)
                elif echo:
                    token_ids = ids + gen_ids
                    dicts = (pdicts or [None] * len(ids)) + gdicts
                    text = tok.decode(ids) + tok.decode(gen_ids, skip_special_tokens=True)
                else:
                    token_ids, dicts, text = gen_ids, gdicts, tok.decode(gen_ids, skip_special_tokens=True)
                lp = self.legacy_logprobs(tok, token_ids, dicts, logprobs, self.decode) if logprobs is not None else None
                choices.append({
                    "index": len(choices), "text": text, "logprobs": lp, "finish_reason": finish, "stop_reason": None,
                    "token_ids": gen_ids if want_ids else None,
                    "prompt_logprobs": self.prompt_logprobs_json(tok, pdicts, self.decode) if pdicts is not None else None,
                    "prompt_token_ids": ids if want_ids else None,
                })
                n_gen += len(gen_ids)  # echo with max_tokens 0 still counts vLLM's one internal token
            n_prompt += len(ids)
        return {
            "id": "cmpl-" + os.urandom(16).hex(), "object": "text_completion", "created": int(time.time()),
            "model": self.name, "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_gen, "completion_tokens": n_gen,
                      "prompt_tokens_details": None},
            "kv_transfer_params": None,
        }

    def chat_completions(self, body):
        if self.policy is None:
            raise ApiError(404, "The model does not support Chat Completions API", None)
        self.check_model(body)
        if body.get("stream"):
            raise bad("streaming is not supported by this test server", "stream")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad("`messages` must be a non-empty list", "messages")
        tok = self.policy_tok
        ids = tok.apply_chat_template(
            msgs, add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False), tokenize=False)
        ids = tok(ids, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.max_model_len - len(ids)
        self.check_len(ids, max_tokens)
        want_lp = bool(body.get("logprobs"))
        top_k = body.get("top_logprobs") or 0
        prompt_logprobs = body.get("prompt_logprobs")
        n = body.get("n") or 1
        seed = body.get("seed")
        params = self.sampling(body, self.gen_defaults)
        pdicts = self.prompt_dicts(ids, prompt_logprobs) if prompt_logprobs is not None else None
        choices, n_gen = [], 0
        for i in range(n):
            gen_ids, gdicts, finish = self.generate(ids, max_tokens, params, None if seed is None else seed + i,
                                                    top_k, bool(body.get("ignore_eos")))
            lp = None
            if want_lp:
                content = []
                for tid, d in zip(gen_ids, gdicts):
                    top = [{"token": self.decode(tok, j), "logprob": max(l, MIN_LOGPROB),
                            "bytes": list(self.decode(tok, j).encode())}
                           for n_, (j, (l, _)) in enumerate(sorted(d.items(), key=lambda kv: kv[1][1])) if n_ < top_k]
                    s = self.decode(tok, tid)
                    content.append({"token": s, "logprob": max(d[tid][0], MIN_LOGPROB), "bytes": list(s.encode()), "top_logprobs": top})
                lp = {"content": content}
            choices.append({
                "index": i, "message": {"role": "assistant", "content": tok.decode(gen_ids, skip_special_tokens=True),
                                        "refusal": None, "annotations": None, "audio": None, "function_call": None,
                                        "tool_calls": [], "reasoning": None},
                "logprobs": lp, "finish_reason": finish, "stop_reason": None,
                "token_ids": gen_ids if body.get("return_token_ids") else None,
            })
            n_gen += len(gen_ids)
        return {
            "id": "chatcmpl-" + os.urandom(16).hex(), "object": "chat.completion", "created": int(time.time()),
            "model": self.name, "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids) + n_gen, "completion_tokens": n_gen,
                      "prompt_tokens_details": None},
            "prompt_logprobs": self.prompt_logprobs_json(tok, pdicts, self.decode) if pdicts is not None else None,
            "prompt_token_ids": ids if body.get("return_token_ids") else None,
            "kv_transfer_params": None,
        }

    @torch.no_grad()
    def head(self, ids):
        model = self.reward
        x = torch.tensor([ids])
        if self.a.pooling == "last":
            hidden = model.base_model(x, attention_mask=torch.ones_like(x)).last_hidden_state[0, -1]
            return model.score(hidden).float()
        return model(x).logits[0].float()

    def activation(self, logits):
        cfg = self.reward.config
        problem = getattr(cfg, "problem_type", None) or ""
        if problem == "regression":
            return logits
        if problem == "multi_label_classification" or cfg.num_labels < 2:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def classify(self, body):
        if self.reward is None:
            raise ApiError(404, "The model does not support Classification API", None)
        self.check_model(body)
        if "normalize" in body:
            raise bad("Parameter `normalize` was removed; use `use_activation` instead.", "normalize")
        use_act = body.get("use_activation")
        for old in ("activation", "softmax"):
            if use_act is None and body.get(old) is not None:
                use_act = body[old]
        if use_act is None:
            use_act = True
        tok = self.reward_tok
        if body.get("messages") is not None:
            text = tok.apply_chat_template(body["messages"], add_generation_prompt=body.get("add_generation_prompt", False),
                                           continue_final_message=body.get("continue_final_message", False), tokenize=False)
            prompts = [tok(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]]
        else:
            if body.get("input") in (None, ""):
                raise bad("Input or messages must be provided", "input")
            prompts = self.prompts_of(body["input"], tok, body.get("add_special_tokens", True), "input")
        id2label = {int(k): v for k, v in (self.reward.config.id2label or {}).items()}
        data, n_prompt = [], 0
        for i, ids in enumerate(prompts):
            self.check_len(ids, 0)
            logits = self.head(ids)
            probs = self.activation(logits) if use_act else logits
            probs = probs.tolist()
            data.append({"index": i, "label": id2label.get(max(range(len(probs)), key=lambda j: probs[j])),
                         "probs": probs, "num_classes": len(probs)})
            n_prompt += len(ids)
        return {
            "id": "classify-" + os.urandom(16).hex(), "object": "list", "created": int(time.time()),
            "model": self.name, "data": data,
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt, "completion_tokens": 0, "prompt_tokens_details": None},
        }


def make_handler(backend):
    routes = {
        "/v1/completions": backend.completions,
        "/v1/chat/completions": backend.chat_completions,
        "/classify": backend.classify,
        "/v1/classify": backend.classify,  # SGLang's alias; harmless here
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            if backend.a.verbose:
                sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

        def reply(self, status, obj):
            payload = b"" if obj is None else json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()
            self.send_response(status)
            if obj is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self.reply(200, None)
            elif path == "/v1/models":
                self.reply(200, backend.models())
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fn = routes.get(path)
            if fn is None:
                self.reply(404, {"detail": "Not Found"})
                return
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise bad("the body must be a JSON object")
                with backend.lock:
                    out = fn(body)
                if backend.a.log:
                    with backend.lock, open(backend.a.log, "a") as f:
                        f.write(json.dumps({"path": path, "body_sha": hashlib.sha256(raw).hexdigest(), "body": body}) + "\n")
                self.reply(200, out)
            except ApiError as e:
                self.reply(e.status, e.body())
            except ValueError as e:
                self.reply(400, bad(f"invalid request: {e}").body())
            except Exception as e:  # noqa: BLE001 - a test server answers 500 like vLLM does
                self.reply(500, ApiError(500, f"{type(e).__name__}: {e}").body())

    return Handler


def main():
    p = argparse.ArgumentParser(description="vLLM-shaped test server over transformers")
    p.add_argument("--policy", help="a causal LM directory (completions, chat)")
    p.add_argument("--reward", help="a *ForSequenceClassification directory (/classify)")
    p.add_argument("--served-name", default="vllm-like")
    p.add_argument("--max-model-len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--pooling", choices=["transformers", "last"], default="transformers",
                   help="score position: transformers' last non-pad token, or vLLM's LAST token")
    p.add_argument("--log", help="append {path, body_sha, body} per answered request")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    if not a.policy and not a.reward:
        p.error("give --policy and/or --reward")
    backend = Backend(a)
    ThreadingHTTPServer.request_queue_size = 1024  # the default 5 drops bursts of connections
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(backend))
    server.daemon_threads = True
    sys.stdout.write(f"PORT {server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass

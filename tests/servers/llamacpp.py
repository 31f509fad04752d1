#!/usr/bin/env python3
"""The real llama.cpp server (``llama-server``'s C++ HTTP server, embedded by the
PyPI package ``xllamacpp`` 2026.10.11549) serving SmolLM2-135M-Instruct Q4_1.

Prints ``PORT <n>`` once ``GET /health`` answers 200, then blocks until killed
(SIGTERM/SIGKILL; the C++ server threads die with the process).

    .venv/bin/python tests/servers/llamacpp.py [--parallel 4] [--gguf FILE] [--alias NAME]

xllamacpp API: ``xllamacpp.CommonParams()`` (llama.cpp's ``common_params``;
``hostnames``, ``port``, ``n_parallel``, ``n_ctx``, ``cpuparams.n_threads``,
``endpoint_metrics``, ``model.path``, ``model_alias``), then
``xllamacpp.Server(params)`` loads the model, starts the HTTP server on a
background thread and returns; ``server.listening_address`` is
``"http://127.0.0.1:<port>"``.

Findings, measured here with this wheel (build_info ``b0-unknown``, CPU, 1 thread):

- **Port 0 works.** ``params.port = 0`` (the default) binds an ephemeral port and
  ``listening_address`` reports the real one; no pick-and-close race needed.
  ``hostnames`` defaults to ``["127.0.0.1"]``.
- **``seed`` is honoured per request** in ``/v1/chat/completions`` (and
  ``/v1/completions``): the same seed gives the same text, different seeds
  differ, also when the prompt comes from the slot's prompt cache.
  Seeds are truncated to 32 bits: seed 2^32+1 gives exactly seed 1's text.
  (``0xFFFFFFFF`` = ``LLAMA_DEFAULT_SEED`` means "random".)
- **Same seed, same text across restarts** with 1 thread: two fresh processes
  gave byte-identical completions for seeds 1, 2, 12345 (temperature 1.0,
  24 tokens). With ``--parallel 4`` and 8 concurrent requests (continuous
  batching of 4 slots) the texts for those seeds were still identical to the
  serial 1-slot run. (Observed, not promised by llama.cpp: batch composition
  can change float sums for bigger models / other backends.)
- **``n`` > 1 is refused**: 400 ``{"error":{"code":400,"message":"Field 'n':
  Value must be between 1 <= value <= 1, but got 2","type":"invalid_request_error"}}``.
- **``echo`` is ignored** on ``/v1/completions``: only the generated tokens come
  back, and ``logprobs`` uses the *chat* shape ``{"content":[{"id","token",
  "bytes","logprob","top_logprobs":[...]}]}``, not the legacy
  ``text_offset/token_logprobs`` one. So no teacher forcing (DESIGN §11 refuses
  ``logprob`` on ``server: llamacpp``).
- **The request ``model`` is not checked**: any name is served.
- **Context length exceeded** (a 3031-token chat prompt, 2048-token slot):
  HTTP 400 ``{"error":{"code":400,"message":"request (3031 tokens) exceeds the
  available context size (2048 tokens), try increasing it","type":
  "exceed_context_size_error","n_prompt_tokens":3031,"n_ctx":2048}}``
  (``/v1/completions`` the same with its own token count).
- **``/metrics``** (Prometheus text, ``llamacpp:prompt_tokens_total`` …) only
  with ``endpoint_metrics = True`` (``--metrics``); otherwise 501
  ``{"error":{"code":501,"message":"This server does not support metrics
  endpoint. Start it with `--metrics`","type":"not_supported_error"}}``.
  ``/slots`` is on by default; ``/props`` answers too.
- **``/v1/models`` has no ``root``.** Shape: ``{"models":[{"name","model",…}],
  "object":"list","data":[{"id":ALIAS,"aliases":[ALIAS],"tags":[],"object":
  "model","architecture":{…},"created":<now>,"owned_by":"llamacpp","meta":
  {"vocab_type":2,"n_vocab":49152,"n_ctx":2048,"n_ctx_train":8192,"n_embd":576,
  "n_params":134515008,"size":96576768,"ftype":"Q4_1"}}]}``. ``id`` is the
  ``model_alias`` if set, else the GGUF path as given. ``meta.n_params``/
  ``size`` are the only weight identity it reports.
- ``n_ctx`` is the *total* KV size shared by the slots (each slot gets
  ``n_ctx / n_parallel``), so this script passes ``--ctx × --parallel``.
- Server-side sampling defaults apply to anything a request leaves out
  (``top_k`` 40, ``top_p`` 0.95, ``min_p`` 0.05, temperature 0.8: ``/slots``).
- Speed here (1 thread): ≈ 100 prompt tokens/s, ≈ 50–55 generated tokens/s
  per slot; load ≈ 0.6 s.
"""

import argparse
import os
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GGUF = os.path.join(ROOT, "data-samples", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    p = argparse.ArgumentParser(description="llama.cpp server (xllamacpp) on SmolLM2-135M-Instruct")
    p.add_argument("--gguf", default=GGUF)
    p.add_argument("--alias", default="smollm2", help="the served model name (the /v1/models id)")
    p.add_argument("--parallel", type=int, default=1, help="slots (n_parallel)")
    p.add_argument("--ctx", type=int, default=2048, help="context per slot")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-metrics", action="store_true", help="leave /metrics off (501)")
    a = p.parse_args()
    if not os.path.isfile(a.gguf):
        sys.exit(f"{a.gguf} is missing: run scripts/fetch-smollm2.sh")

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = a.gguf
    params.model_alias = {a.alias}
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # llama.cpp binds an ephemeral port; listening_address says which
    params.n_parallel = a.parallel
    params.n_ctx = a.ctx * a.parallel
    params.cpuparams.n_threads = a.threads
    params.cpuparams_batch.n_threads = a.threads
    params.n_gpu_layers = 0
    params.endpoint_metrics = not a.no_metrics
    server = xllamacpp.Server(params)  # returns once the model is loaded and the socket listens
    base = server.listening_address
    port = int(base.rsplit(":", 1)[1])

    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("llama.cpp /health did not answer 200 within 120 s")
        time.sleep(0.05)
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    threading.Event().wait()  # serve until killed; `server` stays referenced


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass

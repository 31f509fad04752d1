#!/usr/bin/env python3
"""A scripted OpenAI-compatible server for client-behaviour tests and benches.

Stdlib only (asyncio streams, one thread: hundreds of concurrent keep-alive
connections cost a coroutine each, not a thread). HTTP/1.1 with keep-alive,
Content-Length on every response; request bodies by Content-Length or chunked.

Binds 127.0.0.1 on port 0, prints exactly one line ``PORT <n>`` (flushed) once
listening, then serves until killed.

Endpoints
- ``GET /health`` -> 200, empty body (as vLLM).
- ``GET /v1/models`` -> ``{"object":"list","data":[{"id":NAME,"object":"model","root":ROOT,...}]}``.
- ``POST /v1/chat/completions`` -> ``chat.completion`` with ``choices[i].message.content``.
- ``POST /v1/completions`` -> ``text_completion`` with ``choices[i].text``.

Answers are deterministic: the content is a function of the *canonical* body
(``json.dumps(body, sort_keys=True, separators=(",", ":"))``, so key order and
whitespace do not matter) and the request's ``seed``; ``n`` choices are
returned (choice i from (canonical hash, seed, i)). The number of words is
``1 + h % max_tokens`` (``max_tokens`` or ``max_completion_tokens``, default
16); ``finish_reason`` is ``"length"`` when that equals ``max_tokens``, else
``"stop"``. ``usage.prompt_tokens`` counts whitespace-separated words of the
prompt (or the ids of a token-id prompt), ``completion_tokens`` the words
answered.

Scripted behaviour (all optional)
- ``--log FILE``: appends ``{"path","body_sha","body"}`` per request received
  (``body_sha`` = sha256 hex of the raw body bytes) and ``{"done": body_sha}``
  once its response has been fully written (after the socket drain).
- ``--fail-first K --fail-status S --retry-after SECS``: the first K requests
  with each distinct raw body are answered S (default 503) with
  ``Retry-After: SECS`` (omitted when not given) and an OpenAI error body.
- ``--context-error-marker STR``: a request whose prompt or messages contain
  STR gets OpenAI's 400 ``context_length_exceeded`` error.
- ``--reject-marker STR``: 400 ``invalid_request_error`` / ``content_policy_violation``.
- ``--malformed-marker STR``: 200 with a JSON body without ``choices``.
- ``--latency-ms MEAN --tail-frac F --tail-mult M``: each request sleeps
  ``MEAN * (0.5 + v)`` ms (v uniform in [0,1), so the mean is MEAN), and a
  fraction F of the requests ``M`` times that; v and the tail draw come from
  the canonical body hash, so the same body always gets the same latency.
- ``--slots N``: at most N requests are being served (sleeping) at once; the
  rest queue, as in a server with N batch slots.
- ``--stats FILE``: rewritten in place (one padded JSON line) as each answer is
  about to be sent:
  ``{"requests": answered, "max_in_flight": most requests received and not yet
  answered at once (what the client kept in flight), "max_serving": most inside
  the slots at once, "in_flight": now, "first_t"/"last_t": wall-clock time of
  the first POST received and of the last answer}`` (benches time the
  client's request window with these).
- ``--stall-after K``: after K answers, later requests are read (and logged)
  but never answered: a test can then kill its client at a known point.
- ``--judge`` (with ``--judge-position-bias B --judge-noise N``): a chat
  request whose user message holds ``<<<RESPONSE X>>>`` blocks is answered as
  a listwise judge (DESIGN §12): each response's quality is the first integer
  in its text (0 when none); its score is round(quality + B if shown first +
  N·u), u uniform in [0,1) from (canonical body hash, position); the reply is
  ``<<<EXPLANATION>>>\nid <hash>\n\n<<<RANKING>>>\n`` + the labels by score
  (``>`` between levels, ``=`` for equal scores), or ``{"ranking": ...}`` when
  the request has ``response_format``. A prompt containing
  ``MALFORMED:<reason>`` (``no_ranking``, ``unknown_label``,
  ``repeated_label``, ``missing_label``) gets a reply of that kind. With
  ``--log``, each judge answer is logged as ``{"judge": id, "kind": ok|reason,
  "reply": text, "ranks": {response text: rank}}``.
  A chat request whose user message holds MT-Bench's ``[The Start of
  Assistant A's Answer]`` / ``B`` blocks is answered as a pairwise judge: the
  scores are quality + B if shown first + N·u (not rounded), u from (canonical
  body hash, position); the verdict is ``C`` when the scores differ by at most
  ``--judge-tie-margin M`` (default 0), else the higher-scored label; the reply
  is ``id <hash>\nBy quality.\n\n[[X]]``, or ``{"verdict": "X"}`` with
  ``response_format``. A prompt containing ``MALFORMED:no_verdict`` gets a reply
  without a verdict (``{}`` when structured); ``MALFORMED:conflicting_verdicts``
  one naming both ``[[A]]`` and ``[[B]]`` (structured: ``{"verdict": "A or B"}``,
  logged as ``no_verdict``, the kind a client must report). With ``--log``:
  ``{"judge": id, "pairwise": true, "kind": ok|reason, "reply": text, "first":
  text shown as A, "second": text shown as B, "verdict": "A"|"B"|"C"|null}``.
  Other requests are answered as without ``--judge``.
- ``--model NAME --root ROOT``: the ``/v1/models`` entry and the ``model``
  field of answers; with ``--strict-model`` a request naming another model
  gets vLLM's 404 ``The model `x` does not exist.``
"""

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time

CONTEXT_ERROR = {
    "error": {
        "message": (
            "This model's maximum context length is 2048 tokens. However, you requested 5000 tokens "
            "(4984 in the messages, 16 in the completion). Please reduce the length of the messages or completion."
        ),
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
REJECT_ERROR = {
    "error": {
        "message": "Your request was rejected as a result of our safety system.",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_policy_violation",
    }
}
REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu the a of and to in is it that"
).split()
STATS_SIZE = 512
CREATED = 1700000000  # fixed, so identical requests give byte-identical answers


def error_body(message, type_, code=None, param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def prompt_texts(body):
    """Every string of the prompt/messages (for the markers)."""
    out = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        out.append(prompt)
    elif isinstance(prompt, list):
        out.extend(p for p in prompt if isinstance(p, str))
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out.extend(p.get("text", "") for p in c if isinstance(p, dict))
    return out


def prompt_tokens(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        return sum(len(p) for p in prompt)
    return sum(len(t.split()) for t in prompt_texts(body))


class Scripted:
    def __init__(self, args):
        self.a = args
        self.log = open(args.log, "a", encoding="utf-8", buffering=1) if args.log else None
        self.fail_counts = {}
        self.slots = asyncio.Semaphore(args.slots) if args.slots else None
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.serving = 0
        self.max_serving = 0
        self.stalled = asyncio.Event()  # never set: stalled requests wait forever
        self.first_t = self.last_t = None  # wall clock of the first POST received, the last answered
        self.stats_fd = os.open(args.stats, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if args.stats else None

    # ---- bookkeeping -------------------------------------------------
    def write_log(self, obj):
        if self.log:
            self.log.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def write_stats(self):
        # One pwrite of a fixed-size record at offset 0 (JSON padded with spaces):
        # cheap enough for every request, and a reader never sees a shorter
        # record's leftovers. Written before the answer is sent, so a client
        # that has its last answer reads stats that include it.
        if self.stats_fd is None:
            return
        rec = json.dumps({"requests": self.answered, "max_in_flight": self.max_in_flight,
                          "max_serving": self.max_serving, "in_flight": self.in_flight,
                          "first_t": self.first_t, "last_t": self.last_t}).encode()
        os.pwrite(self.stats_fd, rec.ljust(STATS_SIZE - 1) + b"\n", 0)

    # ---- answers -----------------------------------------------------
    def latency_s(self, key):
        a = self.a
        if a.latency_ms <= 0:
            return 0.0
        v = int.from_bytes(key[0:8], "big") / 2**64
        tail = int.from_bytes(key[8:16], "big") / 2**64 < a.tail_frac
        return a.latency_ms * (0.5 + v) * (a.tail_mult if tail else 1.0) / 1000.0

    def completion(self, path, body, key):
        chat = path.endswith("/chat/completions")
        n = body.get("n") or 1
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = 16
        seed = body.get("seed")
        choices = []
        total = 0
        for i in range(n):
            h = hashlib.sha256(key + f"|{seed}|{i}".encode()).digest()
            k = 0 if max_tokens <= 0 else 1 + int.from_bytes(h[:4], "big") % max_tokens
            stream = b"".join(hashlib.sha256(h + bytes([b])).digest() for b in range(1 + k // 32))
            text = " ".join(WORDS[stream[j] % len(WORDS)] for j in range(k))
            total += k
            finish = "length" if k == max_tokens else "stop"
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        pt = prompt_tokens(body)
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + key.hex()[:24],
            "object": "chat.completion" if chat else "text_completion",
            "created": CREATED,
            "model": self.a.model,
            "choices": choices,
            "usage": {"prompt_tokens": pt, "completion_tokens": total, "total_tokens": pt + total},
        }

    async def handle_post(self, path, raw):
        """-> (status, extra headers, JSON object) for a POST; may sleep."""
        a = self.a
        sha = hashlib.sha256(raw).hexdigest()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            self.write_log({"path": path, "body_sha": sha, "body": None})
            return sha, 400, [], error_body(f"invalid JSON body: {e}", "invalid_request_error")
        self.write_log({"path": path, "body_sha": sha, "body": body})
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return sha, 404, [], error_body(f"no route {path}", "not_found_error")
        if not isinstance(body, dict):
            return sha, 400, [], error_body("body must be a JSON object", "invalid_request_error")
        if a.stall_after is not None and self.answered >= a.stall_after:
            await self.stalled.wait()
        if a.fail_first:
            c = self.fail_counts.get(sha, 0)
            if c < a.fail_first:
                self.fail_counts[sha] = c + 1
                hdrs = [("Retry-After", a.retry_after)] if a.retry_after is not None else []
                kind = "rate_limit_exceeded" if a.fail_status == 429 else "service_unavailable"
                return sha, a.fail_status, hdrs, error_body(f"scripted failure {c + 1} of {a.fail_first}", kind, kind)
        if a.strict_model and body.get("model") != a.model:
            return sha, 404, [], error_body(f"The model `{body.get('model')}` does not exist.", "NotFoundError", 404, "model")
        texts = prompt_texts(body)
        if a.context_error_marker and any(a.context_error_marker in t for t in texts):
            return sha, 400, [], CONTEXT_ERROR
        if a.reject_marker and any(a.reject_marker in t for t in texts):
            return sha, 400, [], REJECT_ERROR
        key = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).digest()
        delay = self.latency_s(key)
        if self.slots:
            async with self.slots:
                await self.serve_for(delay)
        else:
            await self.serve_for(delay)
        if a.malformed_marker and any(a.malformed_marker in t for t in texts):
            return sha, 200, [], {"id": "cmpl-malformed", "object": "chat.completion", "model": a.model, "usage": {}}
        if a.judge and path.endswith("/chat/completions"):
            j = self.judge_answer(body, key)
            if j is not None:
                return sha, 200, [], j
        return sha, 200, [], self.completion(path, body, key)

    def judge_answer(self, body, key):
        """A listwise or pairwise judge's reply (see ``--judge``), or None for other requests."""
        import re
        user = next((m.get("content") for m in reversed(body.get("messages") or [])
                     if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)), None)
        if user is not None and "[The Start of Assistant A's Answer]\n" in user:
            return self.pairwise_answer(body, key, user)
        if user is None or "<<<RESPONSE " not in user:
            return None
        parts = re.split(r"<<<RESPONSE ([A-Z])>>>\n", user)
        head, blocks = parts[0], list(zip(parts[1::2], parts[2::2]))
        labels = [l for l, _ in blocks]
        texts = [t[:-2] if t.endswith("\n\n") else t for _, t in blocks]
        scores = []
        for i, t in enumerate(texts):
            m = re.search(r"-?\d+", t)
            q = int(m.group()) if m else 0
            u = int.from_bytes(hashlib.sha256(key + b"|judge|" + bytes([i])).digest()[:4], "big") / 2**32
            scores.append(round(q + (self.a.judge_position_bias if i == 0 else 0.0) + self.a.judge_noise * u))
        order = sorted(range(len(labels)), key=lambda i: (-scores[i], i))
        ranking, ranks = "", {}
        for k, i in enumerate(order):
            if k > 0:
                ranking += "=" if scores[i] == scores[order[k - 1]] else ">"
            ranks[texts[i]] = 1 + sum(1 for j in range(len(labels)) if scores[j] > scores[i])
            ranking += labels[i]
        kind = "ok"
        m = re.search(r"MALFORMED:(no_ranking|unknown_label|repeated_label|missing_label)", head)
        if m:
            kind = m.group(1)
            ranking = {"no_ranking": "", "unknown_label": ranking + ">Z", "repeated_label": ranking + ">" + labels[order[0]],
                       "missing_label": ranking[:-2]}[kind]
        jid = key.hex()[:12]
        if body.get("response_format") is not None:
            text = json.dumps({"ranking": ranking}) if kind != "no_ranking" else "{}"
        elif kind == "no_ranking":
            text = f"<<<EXPLANATION>>>\nid {jid}\nI cannot rank these."
        else:
            text = f"<<<EXPLANATION>>>\nid {jid}\nBy quality.\n\n<<<RANKING>>>\n{ranking}\n"
        self.write_log({"judge": jid, "kind": kind, "reply": text, "ranks": ranks if kind == "ok" else None})
        pt = prompt_tokens(body)
        ct = len(text.split())
        return {
            "id": "chatcmpl-" + key.hex()[:24], "object": "chat.completion", "created": CREATED, "model": self.a.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }

    def pairwise_answer(self, body, key, user):
        """An MT-Bench pairwise judge's reply (see ``--judge``)."""
        import re
        blocks = dict(re.findall(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", user, re.S))
        head = user.split("[The Start of Assistant A's Answer]")[0]
        texts = [blocks.get("A", ""), blocks.get("B", "")]
        scores = []
        for i, t in enumerate(texts):
            m = re.search(r"-?\d+", t)
            q = int(m.group()) if m else 0
            u = int.from_bytes(hashlib.sha256(key + b"|pair|" + bytes([i])).digest()[:4], "big") / 2**32
            scores.append(q + (self.a.judge_position_bias if i == 0 else 0.0) + self.a.judge_noise * u)
        if abs(scores[0] - scores[1]) <= self.a.judge_tie_margin:
            verdict = "C"
        else:
            verdict = "A" if scores[0] > scores[1] else "B"
        jid = key.hex()[:12]
        structured = body.get("response_format") is not None
        kind = "ok"
        m = re.search(r"MALFORMED:(no_verdict|conflicting_verdicts)", head)
        if m:
            kind = m.group(1)
        if structured:
            text = {"ok": json.dumps({"verdict": verdict}), "no_verdict": "{}",
                    "conflicting_verdicts": json.dumps({"verdict": "A or B"})}[kind]
            if kind == "conflicting_verdicts":
                kind = "no_verdict"  # JSON holds one verdict field: what a client sees is no verdict
        else:
            text = {"ok": f"id {jid}\nBy quality.\n\n[[{verdict}]]", "no_verdict": f"id {jid}\nI cannot decide.",
                    "conflicting_verdicts": f"id {jid}\nEither [[A]] or [[B]], hard to say."}[kind]
        self.write_log({"judge": jid, "pairwise": True, "kind": kind, "reply": text, "first": texts[0], "second": texts[1],
                        "verdict": verdict if kind == "ok" else None})
        pt = prompt_tokens(body)
        ct = len(text.split())
        return {
            "id": "chatcmpl-" + key.hex()[:24], "object": "chat.completion", "created": CREATED, "model": self.a.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }

    async def serve_for(self, delay):
        self.serving += 1
        self.max_serving = max(self.max_serving, self.serving)
        try:
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            self.serving -= 1

    def handle_get(self, path):
        if path == "/health":
            return 200, b""
        if path == "/v1/models":
            entry = {"id": self.a.model, "object": "model", "created": CREATED, "owned_by": "scripted",
                     "root": self.a.root if self.a.root is not None else self.a.model, "parent": None,
                     "max_model_len": 2048}
            return 200, json.dumps({"object": "list", "data": [entry]}).encode()
        return 404, json.dumps(error_body(f"no route {path}", "not_found_error")).encode()

    # ---- HTTP/1.1 ----------------------------------------------------
    async def connection(self, reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self.send(writer, 413, [], b'{"error":{"message":"headers too large"}}', True)
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    await self.send(writer, 400, [], b"", True)
                    return
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                conn = headers.get("connection", "").lower()
                close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    raw = await self.read_chunked(reader)
                else:
                    raw = await reader.readexactly(int(headers.get("content-length") or 0))
                path = target.split("?", 1)[0]
                if method == "GET":
                    status, payload = self.handle_get(path)
                    await self.send(writer, status, [], payload, close)
                elif method == "POST":
                    if self.first_t is None:
                        self.first_t = time.time()
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    try:
                        sha, status, hdrs, obj = await self.handle_post(path, raw)
                        payload = json.dumps(obj, ensure_ascii=False).encode()
                    finally:
                        self.in_flight -= 1
                        self.answered += 1
                        self.last_t = time.time()
                        self.write_stats()
                    await self.send(writer, status, hdrs, payload, close)
                    self.write_log({"done": sha})
                else:
                    await self.send(writer, 405, [], b"", close)
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    @staticmethod
    async def read_chunked(reader):
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    @staticmethod
    async def send(writer, status, headers, payload, close):
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        if payload or status != 200:
            head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(payload)}")
        head.extend(f"{k}: {v}" for k, v in headers)
        if close:
            head.append("Connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log")
    p.add_argument("--stats")
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=503, choices=[408, 429, 500, 502, 503, 504])
    p.add_argument("--retry-after", default=None, help="Retry-After header value (seconds)")
    p.add_argument("--context-error-marker")
    p.add_argument("--reject-marker")
    p.add_argument("--malformed-marker")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--tail-frac", type=float, default=0.0)
    p.add_argument("--tail-mult", type=float, default=10.0)
    p.add_argument("--slots", type=int, default=0, help="0 = unlimited")
    p.add_argument("--stall-after", type=int, default=None)
    p.add_argument("--model", default="scripted")
    p.add_argument("--root", default=None, help="root of the /v1/models entry (default: --model)")
    p.add_argument("--strict-model", action="store_true")
    p.add_argument("--judge", action="store_true")
    p.add_argument("--judge-position-bias", type=float, default=1.5)
    p.add_argument("--judge-noise", type=float, default=1.0)
    p.add_argument("--judge-tie-margin", type=float, default=0.0, help="pairwise: verdict C when |score A - score B| <= this")
    return p.parse_args(argv)


async def main():
    args = parse_args()
    app = Scripted(args)
    server = await asyncio.start_server(app.connection, "127.0.0.1", 0, backlog=4096, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    app.write_stats()
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass

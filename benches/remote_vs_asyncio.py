#!/usr/bin/env python3
"""Remote generation throughput: prefpipe's `generate` stage vs a minimal asyncio client.

A scripted OpenAI-compatible server (tests/servers/scripted.py) with many slots
and long-tailed latencies — like vLLM under load: most answers fast, a few 10×
slower — answers the same N chat/completions requests twice:

1. `prefpipe run` of source → generate (remote model, `max_concurrency` C,
   several chunks), on a fresh run store (so no request cache);
2. a plain aiohttp client that keeps the same C requests in flight and sends
   the *same bodies in the same order* (replayed from the server's request log
   of run 1, so every request gets the same scripted latency).

The time of each side is the server's request window — the first request
received to the last answer sent (`first_t`/`last_t` in the server's
`--stats` file) — so process start-up, planning and the Parquet write do not
count; prefpipe's end-to-end wall time and its stage `elapsed_s` (run.json)
are printed too. Then both again against an instant server (latency 0): that
is prefpipe's maximum requests/s here — bounded by what the one-threaded
Python server can answer (≈2–3k req/s on this machine; the "server CPU"
column near 100% means the server, not the client, is the limit). Each side runs `--repeat` times
(alternating, default 3) and the medians are compared: on a shared 2-core
machine single runs vary by several percent. Goal (the issue): prefpipe ≥ 0.97
of the plain client on the long-tailed server.

`--llamacpp` runs the same against the real llama.cpp server
(tests/servers/llamacpp.py, `--parallel 4`, SmolLM2-135M, 1 thread) with
fewer requests; there the times are wall times of each side (no stats file),
the bodies prefpipe sends are first captured against an instant scripted
server and replayed by the asyncio side, and the llama.cpp server is restarted
between the sides so neither gets the other's prompt cache.

If prefpipe cannot run the pipeline (e.g. a build whose generate stage has no
remote backend yet), the bench says so, prints its error, and still measures
the asyncio side on synthesized bodies of the same shape.

    cargo build --release --bin prefpipe          # the bench runs it if missing (≈20 min cold)
    scripts/setup-venv.sh                         # aiohttp, xllamacpp
    .venv/bin/python benches/remote_vs_asyncio.py [--prompts 500 --n 4 --concurrency 64]
    .venv/bin/python benches/remote_vs_asyncio.py --llamacpp
"""

import argparse
import asyncio
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
MODEL = "bench"


LIVE = []  # servers to kill if the bench dies (e.g. its output pipe closes)
atexit.register(lambda: [s.p.kill() for s in LIVE])


class TestServer:
    """tests/servers/<script> on port 0; reads its `PORT n` line."""

    def __init__(self, script, args, work, tag):
        self.stats = os.path.join(work, f"{tag}.stats.json")
        self.log = os.path.join(work, f"{tag}.log")
        if script == "scripted.py":
            args = [*args, "--stats", self.stats, "--log", self.log]
        self.err = open(os.path.join(work, f"{tag}.stderr"), "w")
        self.p = subprocess.Popen([PYTHON, os.path.join(ROOT, "tests", "servers", script), *args],
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, cwd=ROOT)
        line = self.p.stdout.readline()
        if not line.startswith("PORT "):
            self.p.kill()
            sys.exit(f"{script} did not start: {open(self.err.name).read()[-2000:]}")
        LIVE.append(self)
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def read_stats(self):
        with open(self.stats) as f:
            return json.loads(f.read())

    def bodies(self):
        """Request bodies in the order the server received them (retries dropped)."""
        seen, out = set(), []
        with open(self.log) as f:
            for line in f:
                rec = json.loads(line)
                if "path" in rec and rec["body_sha"] not in seen:
                    seen.add(rec["body_sha"])
                    out.append((rec["path"], rec["body"]))
        return out

    def cpu_s(self):
        """CPU seconds the server used so far (Linux /proc; None elsewhere)."""
        try:
            with open(f"/proc/{self.p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def busy(self, seconds):
        """', server CPU NN%' over a window of `seconds` (≈100%: the server is the bottleneck)."""
        cpu = self.cpu_s()
        return "" if cpu is None or seconds <= 0 else f"; server CPU {100 * cpu / seconds:.0f}%"

    def stop(self):
        self.p.kill()
        self.p.wait()
        LIVE.remove(self)
        self.err.close()


def write_inputs(work, a, port, server_kind):
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for i in range(a.prompts):
            f.write(json.dumps({"prompt": f"Bench prompt {i}: write one sentence about the number {i}."}) + "\n")
    pipeline = os.path.join(work, "pipeline.yaml")
    with open(pipeline, "w") as f:
        f.write(f"""name: bench
chunk_size: {a.chunk_size}
models:
  policy: {{backend: openai, server: {server_kind}, base_url: http://127.0.0.1:{port}/v1, model: {a.model}, max_concurrency: {a.concurrency}}}
stages:
  - {{id: prompts, kind: source, path: prompts.jsonl}}
  - {{id: samples, kind: generate, input: prompts, model: policy, n: {a.n}, max_new_tokens: {a.max_tokens}, temperature: 1.0}}
""")
    return pipeline


def synthesized_bodies(a):
    """What a remote generate stage sends (DESIGN §11): one chat request per sample, n = 1, a seed each."""
    out = []
    for i in range(a.prompts):
        for s in range(a.n):
            out.append(("/v1/chat/completions", {
                "model": a.model,
                "messages": [{"role": "user", "content": f"Bench prompt {i}: write one sentence about the number {i}."}],
                "n": 1, "seed": (i * 7919 + s * 104729) % (2**31 - 1), "temperature": 1.0, "top_p": 1.0,
                "max_tokens": a.max_tokens,
            }))
    return out


def run_prefpipe(binary, pipeline, work, tag):
    store = os.path.join(work, f"store-{tag}")
    t0 = time.perf_counter()
    p = subprocess.run([binary, "run", pipeline, "--store", store], cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return None, p.stderr.strip()[-1500:] or p.stdout.strip()[-1500:]
    elapsed = None
    try:
        with open(os.path.join(store, "run.json")) as f:
            report = json.load(f)
        elapsed = {s["id"]: s for s in report["stages"]}["samples"].get("elapsed_s")
    except (OSError, KeyError, ValueError):
        pass
    return {"wall": wall, "stage_elapsed": elapsed}, None


async def run_asyncio(base_url, bodies, concurrency):
    """The plain client: `concurrency` requests in flight, one connection each, keep-alive."""
    import aiohttp

    root = base_url[: -len("/v1")]
    sem = asyncio.Semaphore(concurrency)
    failures = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        async def one(path, body):
            data = json.dumps(body).encode()
            async with sem:
                async with session.post(root + path, data=data, headers={"Content-Type": "application/json"}) as r:
                    j = json.loads(await r.read())
                    if r.status != 200 or not j.get("choices"):
                        failures.append((r.status, str(j)[:200]))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p, b) for p, b in bodies))
        wall = time.perf_counter() - t0
    if failures:
        sys.exit(f"asyncio client: {len(failures)} failed requests, first: {failures[0]}")
    return wall


def window(stats):
    return stats["last_t"] - stats["first_t"]


def ensure_binary(binary, default):
    if os.path.exists(binary):
        return
    if os.path.abspath(binary) != os.path.abspath(default):
        sys.exit(f"{binary} does not exist")
    print(f"{binary} is missing: running `cargo build --release --bin prefpipe` (≈20 min cold on 2 cores)", flush=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "prefpipe"], cwd=ROOT, check=True)


def fmt_rate(n, s):
    return f"{n} requests in {s:.2f} s = {n / s:8.1f} req/s"


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def scripted_phase(a, work, label, server_args, tag):
    """prefpipe then asyncio (each --repeat times, alternating) against fresh scripted
    servers with server_args; returns the median rates (prefpipe or None, asyncio)."""
    print(f"\n{label}")
    pp_rates, as_rates, bodies = [], [], None
    for r in range(a.repeat):
        if not a.asyncio_only and (r == 0 or pp_rates):
            srv = TestServer("scripted.py", [*server_args, "--model", a.model], work, f"{tag}-prefpipe-{r}")
            res, err = run_prefpipe(a.bin, write_inputs(work, a, srv.port, "vllm"), work, f"{tag}-{r}")
            if res is not None:
                st = srv.read_stats()
                w = window(st)
                pp_rates.append(st["requests"] / w)
                if bodies is None:
                    bodies = srv.bodies()
                extra = f"; end-to-end {res['wall']:.2f} s"
                if res["stage_elapsed"] is not None:
                    extra += f", stage elapsed_s {res['stage_elapsed']:.2f}"
                print(f"  prefpipe : {fmt_rate(st['requests'], w)} (server window){extra}; "
                      f"max in flight {st['max_in_flight']}{srv.busy(w)}")
                if st["requests"] != a.prompts * a.n:
                    print(f"  note: the server saw {st['requests']} requests, expected {a.prompts * a.n}")
            else:
                print(f"  prefpipe : not measured: {err}")
            srv.stop()
        if bodies is None:
            bodies = synthesized_bodies(a)
            print("  (the asyncio side sends synthesized bodies of the same shape)")
        srv = TestServer("scripted.py", [*server_args, "--model", a.model], work, f"{tag}-asyncio-{r}")
        wall = asyncio.run(run_asyncio(srv.base_url, bodies, a.concurrency))
        st = srv.read_stats()
        w = window(st)
        busy = srv.busy(w)
        srv.stop()
        as_rates.append(st["requests"] / w)
        print(f"  asyncio  : {fmt_rate(st['requests'], w)} (server window); client wall {wall:.2f} s; "
              f"max in flight {st['max_in_flight']}{busy}")
    pp = median(pp_rates) if pp_rates else None
    asy = median(as_rates)
    if pp is not None:
        print(f"  median of {a.repeat}: prefpipe {pp:.1f} req/s, asyncio {asy:.1f} req/s, ratio {pp / asy:.3f}")
    return pp, asy


def scripted_bench(a, work):
    n = a.prompts * a.n
    mean = a.latency_ms * (1 + a.tail_frac * (a.tail_mult - 1))
    print(f"scripted server: {a.slots} slots, latency mean {a.latency_ms:g} ms with {a.tail_frac:.0%} × {a.tail_mult:g}; "
          f"{a.prompts} prompts × n {a.n} = {n} requests; concurrency {a.concurrency}; chunk_size {a.chunk_size}")
    print(f"ideal: concurrency / mean latency = {a.concurrency / (mean / 1000):.1f} req/s (mean latency {mean:.1f} ms)")
    tail = ["--slots", str(a.slots), "--latency-ms", str(a.latency_ms), "--tail-frac", str(a.tail_frac), "--tail-mult", str(a.tail_mult)]
    pp, asy = scripted_phase(a, work, "long-tailed server", tail, "tail")
    pp0, asy0 = scripted_phase(a, work, "instant server (prefpipe's maximum requests/s)", ["--slots", str(a.slots)], "instant")
    print("\nsummary")
    if pp is not None:
        verdict = "meets" if pp / asy >= 0.97 else "MISSES"
        print(f"  long-tailed: prefpipe {pp:.1f} req/s, asyncio {asy:.1f} req/s, ratio {pp / asy:.3f} ({verdict} the 0.97 goal)")
    else:
        print(f"  long-tailed: asyncio {asy:.1f} req/s (prefpipe not measured)")
    if pp0 is not None:
        print(f"  instant    : prefpipe {pp0:.1f} req/s, asyncio {asy0:.1f} req/s, ratio {pp0 / asy0:.3f}")
    else:
        print(f"  instant    : asyncio {asy0:.1f} req/s (prefpipe not measured)")


def llamacpp_bench(a, work):
    n = a.prompts * a.n
    print(f"llama.cpp server (xllamacpp, SmolLM2-135M Q4_1, 1 thread, --parallel {a.parallel}); "
          f"{a.prompts} prompts × n {a.n} = {n} requests of {a.max_tokens} tokens; concurrency {a.concurrency}")
    bodies = synthesized_bodies(a)
    measure_pp = not a.asyncio_only
    if measure_pp:
        # llama.cpp keeps no request log: capture prefpipe's exact bodies first
        # against an instant scripted server (untimed), to replay them below.
        cap = TestServer("scripted.py", ["--model", a.model], work, "llama-capture")
        res, err = run_prefpipe(a.bin, write_inputs(work, a, cap.port, "llamacpp"), work, "capture")
        if res is not None:
            bodies = cap.bodies()
        else:
            measure_pp = False
            print(f"  prefpipe : not measured: {err}")
            print("  (the asyncio side sends synthesized bodies of the same shape)")
        cap.stop()
    pp_rates, as_rates = [], []
    for r in range(a.repeat):
        if measure_pp and (r == 0 or pp_rates):
            srv = TestServer("llamacpp.py", ["--parallel", str(a.parallel), "--alias", a.model], work, f"llama-prefpipe-{r}")
            res, err = run_prefpipe(a.bin, write_inputs(work, a, srv.port, "llamacpp"), work, f"llama-{r}")
            srv.stop()
            if res is not None:
                pp_rates.append(n / res["wall"])
                extra = f", stage elapsed_s {res['stage_elapsed']:.2f}" if res["stage_elapsed"] is not None else ""
                print(f"  prefpipe : {fmt_rate(n, res['wall'])} (end-to-end wall{extra})")
            else:
                print(f"  prefpipe : not measured: {err}")
        # A fresh server: neither side gets the other's slot prompt cache.
        srv = TestServer("llamacpp.py", ["--parallel", str(a.parallel), "--alias", a.model], work, f"llama-asyncio-{r}")
        wall = asyncio.run(run_asyncio(srv.base_url, bodies, a.concurrency))
        srv.stop()
        as_rates.append(n / wall)
        print(f"  asyncio  : {fmt_rate(n, wall)} (client wall)")
    asy = median(as_rates)
    if pp_rates:
        pp = median(pp_rates)
        print(f"  median of {a.repeat}: prefpipe {pp:.2f} req/s, asyncio {asy:.2f} req/s, ratio {pp / asy:.3f} "
              f"(prefpipe's time includes its process start-up)")
    else:
        print(f"  median of {a.repeat}: asyncio {asy:.2f} req/s (prefpipe not measured)")


def main():
    default_bin = os.path.join(ROOT, "target", "release", "prefpipe")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=default_bin, help="the prefpipe binary (default target/release/prefpipe)")
    ap.add_argument("--llamacpp", action="store_true", help="against the llama.cpp server instead")
    ap.add_argument("--prompts", type=int, default=None, help="default 500 (llama.cpp: 12)")
    ap.add_argument("--n", type=int, default=None, help="samples per prompt (default 4; llama.cpp: 2)")
    ap.add_argument("--concurrency", type=int, default=None, help="max_concurrency (default 64; llama.cpp: 4)")
    ap.add_argument("--chunk-size", type=int, default=None, help="default 50 (llama.cpp: 4)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--tail-frac", type=float, default=0.05)
    ap.add_argument("--tail-mult", type=float, default=10.0)
    ap.add_argument("--parallel", type=int, default=4, help="llama.cpp slots")
    ap.add_argument("--model", default=MODEL, help="the served model name")
    ap.add_argument("--asyncio-only", action="store_true", help="measure only the asyncio client")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; medians are compared")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    big = not a.llamacpp
    a.prompts = a.prompts or (500 if big else 12)
    a.n = a.n or (4 if big else 2)
    a.concurrency = a.concurrency or (64 if big else a.parallel)
    a.chunk_size = a.chunk_size or (50 if big else 4)
    if not os.path.exists(PYTHON):
        sys.exit(f"{PYTHON} is missing: run scripts/setup-venv.sh")
    if not a.asyncio_only:
        ensure_binary(a.bin, default_bin)
    work = tempfile.mkdtemp(prefix="prefpipe-bench-remote-")
    load0 = os.getloadavg()
    try:
        if a.llamacpp:
            llamacpp_bench(a, work)
        else:
            scripted_bench(a, work)
        load1 = os.getloadavg()
        print(f"\nload average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} "
              f"({os.cpu_count()} CPUs)")
    finally:
        if a.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""reward_points selection + export: prefpipe vs DuckDB SQL (issue 2/3 benchmark).

Builds a scored table (default 400k prompts x 5 samples = 2M rows) with DuckDB,
then runs the same work both ways, 2 threads each:

  prefpipe: source -> select (strategy: reward_points, max vs mu-2sigma) -> export parquet
  DuckDB:   window mean/stddev_pop per prompt, arg_max(reward), arg_min |r - (mu-2sigma)|,
            join back the texts, COPY ... TO parquet

and prints the median wall time of each, the ratio, and peak RSS.

    cargo build --release --bin prefpipe
    benches/setup.sh                         # .venv with duckdb, torch, transformers
    .venv/bin/python benches/select_vs_duckdb.py [--prompts 400000] [--samples 5] [--runs 3]

Other strategies: --strategy small_margin | repeat_ranking | max_min (same data;
logp/judge columns are generated too).
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DUCKDB_SQL = {
    # Ties: DuckDB's arg_max/arg_min pick an arbitrary row among equals; the
    # generated rewards are continuous, so ties do not occur in practice.
    "reward_points": """
        CREATE TEMP TABLE s AS SELECT * FROM read_parquet('{data}');
        COPY (
          WITH st AS (
            SELECT prompt_id, avg(reward) AS mu, stddev_pop(reward) AS sd, count(*) AS n
            FROM s GROUP BY prompt_id),
          pick AS (
            SELECT s.prompt_id,
                   arg_max(s.sample_idx, s.reward) AS chosen_idx,
                   arg_min(s.sample_idx, abs(s.reward - (st.mu - 2 * st.sd))) AS rejected_idx,
                   any_value(st.mu) AS reward_mean, any_value(st.sd) AS reward_std
            FROM s JOIN st USING (prompt_id) WHERE st.n >= 2 GROUP BY s.prompt_id)
          SELECT p.prompt_id, c.prompt, c.response AS chosen, r.response AS rejected,
                 p.chosen_idx, p.rejected_idx, c.reward AS chosen_reward, r.reward AS rejected_reward,
                 c.reward - r.reward AS margin, p.reward_mean, p.reward_std
          FROM pick p
          JOIN s c ON c.prompt_id = p.prompt_id AND c.sample_idx = p.chosen_idx
          JOIN s r ON r.prompt_id = p.prompt_id AND r.sample_idx = p.rejected_idx
          WHERE c.reward > r.reward
        ) TO '{out}' (FORMAT parquet, COMPRESSION zstd);
    """,
    "max_min": """
        CREATE TEMP TABLE s AS SELECT * FROM read_parquet('{data}');
        COPY (
          WITH pick AS (
            SELECT prompt_id, arg_max(sample_idx, reward) AS chosen_idx, arg_min(sample_idx, reward) AS rejected_idx
            FROM s GROUP BY prompt_id HAVING count(*) >= 2)
          SELECT p.prompt_id, c.prompt, c.response AS chosen, r.response AS rejected,
                 p.chosen_idx, p.rejected_idx, c.reward AS chosen_reward, r.reward AS rejected_reward,
                 c.reward - r.reward AS margin
          FROM pick p
          JOIN s c ON c.prompt_id = p.prompt_id AND c.sample_idx = p.chosen_idx
          JOIN s r ON r.prompt_id = p.prompt_id AND r.sample_idx = p.rejected_idx
          WHERE c.reward > r.reward
        ) TO '{out}' (FORMAT parquet, COMPRESSION zstd);
    """,
    # small_margin: per prompt the pair (i<j, r_i != r_j) with the smallest |beta*(d_i - d_j)|,
    # then the keep=0.5 fraction with the smallest margin corpus-wide.
    "small_margin": """
        CREATE TEMP TABLE s AS SELECT *, 0.1 * (logp_policy - logp_reference) AS ir FROM read_parquet('{data}');
        COPY (
          WITH pr AS (
            SELECT a.prompt_id,
                   CASE WHEN a.reward > b.reward THEN a.sample_idx ELSE b.sample_idx END AS chosen_idx,
                   CASE WHEN a.reward > b.reward THEN b.sample_idx ELSE a.sample_idx END AS rejected_idx,
                   abs(a.ir - b.ir) AS m
            FROM s a JOIN s b ON a.prompt_id = b.prompt_id AND a.sample_idx < b.sample_idx
            WHERE a.reward <> b.reward),
          best AS (
            SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY prompt_id ORDER BY m, chosen_idx, rejected_idx) AS rn FROM pr) WHERE rn = 1),
          kept AS (
            SELECT * FROM (SELECT *, row_number() OVER (ORDER BY m, prompt_id) AS k, count(*) OVER () AS total FROM best)
            WHERE k <= ceil(0.5 * total))
          SELECT p.prompt_id, c.prompt, c.response AS chosen, r.response AS rejected, p.chosen_idx, p.rejected_idx,
                 c.reward AS chosen_reward, r.reward AS rejected_reward, c.reward - r.reward AS margin,
                 c.ir - r.ir AS implicit_margin
          FROM kept p
          JOIN s c ON c.prompt_id = p.prompt_id AND c.sample_idx = p.chosen_idx
          JOIN s r ON r.prompt_id = p.prompt_id AND r.sample_idx = p.rejected_idx
          ORDER BY p.prompt_id
        ) TO '{out}' (FORMAT parquet, COMPRESSION zstd);
    """,
    # repeat_ranking over 3 judge columns: competition ranks per judge, Kendall's W,
    # Borda with fractional ranks; keep W >= 0.5.
    "repeat_ranking": """
        CREATE TEMP TABLE s AS SELECT * FROM read_parquet('{data}');
        COPY (
          WITH rk AS (
            SELECT prompt_id, sample_idx, reward, prompt, response,
                   rank() OVER (PARTITION BY prompt_id ORDER BY judge_1 DESC) AS r1,
                   rank() OVER (PARTITION BY prompt_id ORDER BY judge_2 DESC) AS r2,
                   rank() OVER (PARTITION BY prompt_id ORDER BY judge_3 DESC) AS r3,
                   (rank() OVER (PARTITION BY prompt_id ORDER BY judge_1 DESC) + count(*) OVER (PARTITION BY prompt_id, judge_1) - 1 + rank() OVER (PARTITION BY prompt_id ORDER BY judge_1 DESC)) / 2.0 AS f1,
                   (rank() OVER (PARTITION BY prompt_id ORDER BY judge_2 DESC) + count(*) OVER (PARTITION BY prompt_id, judge_2) - 1 + rank() OVER (PARTITION BY prompt_id ORDER BY judge_2 DESC)) / 2.0 AS f2,
                   (rank() OVER (PARTITION BY prompt_id ORDER BY judge_3 DESC) + count(*) OVER (PARTITION BY prompt_id, judge_3) - 1 + rank() OVER (PARTITION BY prompt_id ORDER BY judge_3 DESC)) / 2.0 AS f3,
                   count(*) OVER (PARTITION BY prompt_id) AS n
            FROM s),
          item AS (SELECT *, r1 + r2 + r3 AS R, 3 * (n + 1) - (f1 + f2 + f3) AS borda FROM rk),
          w AS (
            SELECT prompt_id, 12 * sum((R - 3 * (n + 1) / 2.0) ^ 2) / (9 * (any_value(n) ^ 3 - any_value(n))) AS kendall_w,
                   arg_max(sample_idx, borda) AS chosen_idx, arg_min(sample_idx, borda) AS rejected_idx,
                   max(borda) AS chosen_borda, min(borda) AS rejected_borda
            FROM item WHERE n >= 2 GROUP BY prompt_id)
          SELECT w.prompt_id, c.prompt, c.response AS chosen, r.response AS rejected, w.chosen_idx, w.rejected_idx,
                 c.reward AS chosen_reward, r.reward AS rejected_reward, c.reward - r.reward AS margin,
                 w.kendall_w, w.chosen_borda, w.rejected_borda
          FROM w
          JOIN s c ON c.prompt_id = w.prompt_id AND c.sample_idx = w.chosen_idx
          JOIN s r ON r.prompt_id = w.prompt_id AND r.sample_idx = w.rejected_idx
          WHERE w.kendall_w >= 0.5 AND w.chosen_borda > w.rejected_borda
        ) TO '{out}' (FORMAT parquet, COMPRESSION zstd);
    """,
}

PIPELINE_PARAMS = {
    "reward_points": "strategy: reward_points\n    chosen: max\n    rejected: mu-2sigma",
    "max_min": "strategy: max_min",
    "small_margin": "strategy: small_margin\n    beta: 0.1\n    keep: 0.5",
    "repeat_ranking": "strategy: repeat_ranking\n    rankers: [judge_1, judge_2, judge_3]\n    min_w: 0.5",
}


def make_data(path, prompts, samples):
    import duckdb

    con = duckdb.connect()
    con.execute("SELECT setseed(0.42)")
    con.execute(f"""
        COPY (
          SELECT 'p' || lpad(CAST(p AS VARCHAR), 7, '0') AS prompt_id,
                 'Prompt ' || p || ': explain the trade-offs of approach ' || (p % 97) || ' in two paragraphs.' AS prompt,
                 CAST(s AS UINTEGER) AS sample_idx,
                 'Response ' || s || ' to prompt ' || p || '. ' || repeat('Some words of an answer. ', 6 + (p * 7 + s) % 8) AS response,
                 random() * 6 - 3 AS reward,
                 -40 - random() * 20 AS logp_policy,
                 -40 - random() * 20 AS logp_reference,
                 random() * 10 AS judge_1, random() * 10 AS judge_2, random() * 10 AS judge_3
          FROM range({prompts}) t(p), range({samples}) u(s)
          ORDER BY p, s
        ) TO '{path}' (FORMAT parquet, COMPRESSION zstd)
    """)


def timed(cmd, env=None):
    """Wall seconds and peak RSS (MiB) of a command, via GNU time (a forked
    child's ru_maxrss would start at this Python process's own size)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    err = p.stderr.decode()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return wall, int(err.strip().splitlines()[-1]) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=400_000)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=50_000)
    ap.add_argument("--strategy", default="reward_points", choices=sorted(DUCKDB_SQL))
    ap.add_argument("--prefpipe", default=os.path.join(ROOT, "target/release/prefpipe"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="prefpipe-bench-")
    data = os.path.join(work, "scored.parquet")
    t0 = time.perf_counter()
    make_data(data, args.prompts, args.samples)
    rows = args.prompts * args.samples
    print(f"data: {rows:,} rows ({os.path.getsize(data) / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s; strategy {args.strategy}")

    pipeline = os.path.join(work, "bench.yaml")
    with open(pipeline, "w") as f:
        f.write(textwrap.dedent(f"""\
            name: bench
            chunk_size: {args.chunk_size}
            stages:
              - id: scored
                kind: source
                path: scored.parquet
              - id: pairs
                kind: select
                input: scored
                {{params}}
              - id: export
                kind: export
                input: pairs
                path: prefpipe-out.parquet
            """).replace("{params}", PIPELINE_PARAMS[args.strategy]))

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    sql = DUCKDB_SQL[args.strategy].format(data=data, out=os.path.join(work, "duckdb-out.parquet"))
    script = f"import duckdb; con = duckdb.connect(); con.execute('SET threads={args.threads}'); con.execute({sql!r})"
    # The data file was just written: flush it so its writeback does not land on
    # whichever tool runs first, and alternate the tools so drift in the
    # machine's state (page cache, other load) falls on both alike.
    os.sync()
    pp_times, pp_rss, dk_times, dk_rss = [], [], [], []
    for _ in range(args.runs):
        store = os.path.join(work, "store")
        shutil.rmtree(store, ignore_errors=True)
        os.sync()
        t, rss = timed([args.prefpipe, "run", pipeline, "--store", store], env)
        pp_times.append(t)
        pp_rss.append(rss)
        os.sync()
        t, rss = timed([sys.executable, "-c", script])
        dk_times.append(t)
        dk_rss.append(rss)

    import duckdb

    n_pp = duckdb.sql(f"SELECT count(*) FROM '{work}/prefpipe-out.parquet'").fetchall()[0][0]
    n_dk = duckdb.sql(f"SELECT count(*) FROM '{work}/duckdb-out.parquet'").fetchall()[0][0]
    pp, dk = statistics.median(pp_times), statistics.median(dk_times)
    print(f"prefpipe: median {pp:.2f}s  runs {[round(x, 2) for x in pp_times]}  peak RSS {max(pp_rss):.0f} MiB  rows out {n_pp:,}")
    print(f"duckdb:   median {dk:.2f}s  runs {[round(x, 2) for x in dk_times]}  peak RSS {max(dk_rss):.0f} MiB  rows out {n_dk:,}")
    print(f"ratio prefpipe/duckdb: {pp / dk:.2f}x  ({'prefpipe faster' if pp < dk else 'duckdb faster'})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

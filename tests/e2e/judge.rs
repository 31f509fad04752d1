//! The judge stage (DESIGN §12, issue 10): the scripted judge server
//! (`scripted.py --judge`: ranks by a number in each response, with position
//! bias, noise and malformed replies on marked prompts), the real llama.cpp
//! server with `structured: true`, the example pipeline, and bad input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use arrow::array::{Array, Float64Array, StringArray, UInt32Array};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use crate::common::{bin, read, root, stderr};
use crate::servers::Server;

const REASONS: [&str; 4] = ["no_ranking", "unknown_label", "repeated_label", "missing_label"];

/// Samples: prompts `p0..p3` with 4 samples each (quality = a number in the
/// text), and one prompt per malformed reason.
fn samples_jsonl(dir: &Path) {
    let mut lines = String::new();
    let mut row = |id: &str, prompt: &str, s: u32, q: i64| {
        let r = serde_json::json!({"prompt_id": id, "prompt": prompt, "sample_idx": s, "response": format!("An answer of quality {q}, sample {s}.{}", " More.".repeat(s as usize))});
        lines.push_str(&format!("{r}\n"));
    };
    for p in 0..4 {
        for (s, q) in [(0u32, 10 + p), (1, 40 - p), (2, 20), (3, 30 + 2 * p)] {
            row(&format!("p{p}"), &format!("Question {p}?"), s, q);
        }
    }
    for reason in REASONS {
        for s in 0..3u32 {
            row(&format!("m-{reason}"), &format!("Question MALFORMED:{reason}"), s, 10 * s as i64);
        }
    }
    std::fs::write(dir.join("samples.jsonl"), lines).unwrap();
}

fn judge_yaml(url: &str, judge_extra: &str, select: &str) -> String {
    format!(
        "name: judge-test
chunk_size: 3
models:
  judge:
    backend: openai
    base_url: {url}
    model: scripted
    wait_ready_s: 60
stages:
  - id: samples
    kind: source
    path: samples.jsonl
  - id: judged
    kind: judge
    input: samples
    model: judge
    repeats: 3
    max_tokens: 64
{judge_extra}  - id: out
    kind: export
    input: judged
    path: judged.parquet
  - id: pairs
    kind: select
    input: judged
    strategy: repeat_ranking
{select}  - id: pairs_out
    kind: export
    input: pairs
    path: pairs.parquet
"
    )
}

fn run_in(dir: &Path, store: &Path) -> std::process::Output {
    Command::new(bin()).args(["run", "pipeline.yaml", "--store", store.to_str().unwrap()]).current_dir(dir).output().unwrap()
}

fn one(batches: Vec<RecordBatch>) -> RecordBatch {
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn strs(b: &RecordBatch, c: &str) -> Vec<Option<String>> {
    let a = arrow::compute::cast(b.column_by_name(c).unwrap(), &arrow::datatypes::DataType::Utf8).unwrap();
    let a = a.as_any().downcast_ref::<StringArray>().unwrap();
    (0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i).to_string())).collect()
}

fn u32s(b: &RecordBatch, c: &str) -> Vec<Option<u32>> {
    let a = b.column_by_name(c).unwrap().as_any().downcast_ref::<UInt32Array>().unwrap();
    (0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i))).collect()
}

fn stage<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no stage {id} in {run}"))
}

/// (prompt_id, repeat) → [(sample_idx, position, rank)] and the status of each ranking.
type Rankings = BTreeMap<(String, u32), Vec<(u32, u32, Option<u32>)>>;

fn rankings(t: &RecordBatch) -> (Rankings, HashMap<(String, u32), String>) {
    let (ids, idx, rep, rank, pos, status) =
        (strs(t, "prompt_id"), u32s(t, "sample_idx"), u32s(t, "repeat"), u32s(t, "rank"), u32s(t, "position"), strs(t, "status"));
    let mut r: Rankings = BTreeMap::new();
    let mut st = HashMap::new();
    for i in 0..t.num_rows() {
        let k = (ids[i].clone().unwrap(), rep[i].unwrap());
        r.entry(k.clone()).or_default().push((idx[i].unwrap(), pos[i].unwrap(), rank[i]));
        st.insert(k, status[i].clone().unwrap());
    }
    (r, st)
}

#[test]
fn scripted_judge_rankings_failures_orders_and_repeat_ranking() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("server.log");
    let server = Server::start("scripted.py", &["--judge", "--log", log.to_str().unwrap()]);
    samples_jsonl(d.path());
    std::fs::write(d.path().join("pipeline.yaml"), judge_yaml(&server.base_url(), "", "    min_repeats: 2\n")).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = one(read(&d.path().join("judged.parquet")));
    // 4 prompts × 4 samples + 4 × 3, 3 repeats each.
    assert_eq!(t.num_rows(), (16 + 12) * 3);

    // 1. Un-shuffled, the table equals what the server answered: each logged reply's rank by response text.
    let logged: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l.get("judge").is_some())
        .collect();
    assert_eq!(logged.len(), 8 * 3, "one judge request per (prompt, repeat)");
    let by_reply: HashMap<&str, &Value> = logged.iter().map(|l| (l["reply"].as_str().unwrap(), l)).collect();
    let (judg, resp, status, rank) = (strs(&t, "judgment"), strs(&t, "response"), strs(&t, "status"), u32s(&t, "rank"));
    for i in 0..t.num_rows() {
        let l = by_reply[judg[i].as_deref().unwrap()];
        let kind = l["kind"].as_str().unwrap();
        assert_eq!(status[i].as_deref(), Some(kind), "row {i}");
        if kind == "ok" {
            assert_eq!(rank[i], Some(l["ranks"][resp[i].as_deref().unwrap()].as_u64().unwrap() as u32), "row {i}");
        } else {
            assert_eq!(rank[i], None, "row {i}: a failed ranking has no rank");
        }
    }

    // 2. Each malformed reply is counted under its reason (and only those fail).
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    let j = &stage(&run, "judged")["backend"]["judge"];
    for reason in REASONS {
        assert_eq!(j["parse_failures"][reason], 3, "{reason}: {j}");
    }
    assert_eq!(j["rankings"], 24);
    assert_eq!(j["ok"], 12);
    let (r, st) = rankings(&t);
    for ((id, _), s) in &st {
        let want = id.strip_prefix("m-").unwrap_or("ok");
        assert_eq!(s, want, "{id}");
    }
    // The server's first-shown bonus (+1.5) shows in the position-bias figure.
    let first = j["first_shown_win_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&first) && j["longer_response_win_rate"].is_number(), "{j}");

    // 3. Repeats of a prompt are shown in different orders.
    for p in 0..4 {
        let orders: HashSet<Vec<u32>> = (0..3u32)
            .map(|k| {
                let mut v = r[&(format!("p{p}"), k)].clone();
                v.sort_by_key(|x| x.1);
                v.iter().map(|x| x.0).collect()
            })
            .collect();
        assert!(orders.len() >= 2, "p{p}: every repeat shown in the same order");
    }

    // 4. repeat_ranking on the table: W and Borda recomputed here from the ok rankings.
    let pairs = one(read(&d.path().join("pairs.parquet")));
    let ids = strs(&pairs, "prompt_id");
    assert_eq!(ids.iter().flatten().cloned().collect::<Vec<_>>(), ["p0", "p1", "p2", "p3"]);
    let w = pairs.column_by_name("kendall_w").unwrap().as_any().downcast_ref::<Float64Array>().unwrap();
    let cidx = u32s(&pairs, "chosen_idx");
    for (row, p) in (0..4).enumerate() {
        // ranks[k][s] over samples 0..4.
        let ranks: Vec<Vec<f64>> = (0..3u32)
            .map(|k| {
                let mut v = r[&(format!("p{p}"), k)].clone();
                v.sort_by_key(|x| x.0);
                v.iter().map(|x| x.2.unwrap() as f64).collect()
            })
            .collect();
        let rs: Vec<f64> = (0..4).map(|s| ranks.iter().map(|b| b[s]).sum()).collect();
        let mean = rs.iter().sum::<f64>() / 4.0;
        let s2: f64 = rs.iter().map(|x| (x - mean).powi(2)).sum();
        let want_w = 12.0 * s2 / (9.0 * 60.0);
        assert!((w.value(row) - want_w).abs() < 1e-12, "p{p}: {} vs {want_w}", w.value(row));
        // Borda: n − fractional rank + 1 per ballot (ties share the mean position); chosen = the
        // highest total, ties → the lowest sample_idx.
        let mut borda = [0.0f64; 4];
        for b in &ranks {
            for s in 0..4 {
                let tied = b.iter().filter(|&&x| x == b[s]).count() as f64;
                borda[s] += 4.0 - (b[s] + (tied - 1.0) / 2.0) + 1.0;
            }
        }
        let best = (0..4).fold(0, |a, s| if borda[s] > borda[a] { s } else { a });
        assert_eq!(cidx[row], Some(best as u32), "p{p}: Borda {borda:?}");
    }
    drop(server);
}

#[test]
fn scripted_judge_without_noise_gives_the_hand_checked_pairs() {
    // No position bias, no noise: every repeat ranks by quality alone, so W = 1 and
    // Borda = 3 repeats × (n − rank + 1): chosen gets 3·4 = 12, rejected 3·1 = 3.
    // p0: qualities (10, 40, 20, 30) → chosen 1, rejected 0. p1: (11, 39, 20, 32) → 1, 0.
    // p2: (12, 38, 20, 34) → 1, 0. p3: (13, 37, 20, 36) → 1, 0.
    let d = tempfile::tempdir().unwrap();
    let server = Server::start("scripted.py", &["--judge", "--judge-position-bias", "0", "--judge-noise", "0"]);
    samples_jsonl(d.path());
    std::fs::write(d.path().join("pipeline.yaml"), judge_yaml(&server.base_url(), "", "    min_repeats: 3\n")).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    let pairs = one(read(&d.path().join("pairs.parquet")));
    assert_eq!(strs(&pairs, "prompt_id").into_iter().flatten().collect::<Vec<_>>(), ["p0", "p1", "p2", "p3"]);
    assert_eq!(u32s(&pairs, "chosen_idx"), [Some(1); 4]);
    assert_eq!(u32s(&pairs, "rejected_idx"), [Some(0); 4]);
    assert_eq!(strs(&pairs, "kendall_w"), vec![Some("1.0".to_string()); 4]);
    assert_eq!(strs(&pairs, "chosen_borda"), vec![Some("12.0".to_string()); 4]);
    assert_eq!(strs(&pairs, "rejected_borda"), vec![Some("3.0".to_string()); 4]);
    // The malformed prompts have no ok repeat: dropped as too_few_rankings.
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    assert_eq!(stage(&run, "pairs")["drops"]["too_few_rankings"], 4, "{run}");
    // Length bias, hand-checked: in p0..p3 the longer response (higher sample_idx) wins the pairs
    // (0,1), (0,2), (0,3), (2,3) and loses (1,2), (1,3): 4 of 6 pairs, in every ranking.
    let j = &stage(&run, "judged")["backend"]["judge"];
    assert_eq!(j["longer_response_pairs"], 4 * 3 * 6, "{j}");
    assert_eq!(j["longer_response_win_rate"].as_f64(), Some(4.0 / 6.0), "{j}");
    drop(server);
}

#[test]
fn scripted_judge_structured_and_max_candidates() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("server.log");
    let server = Server::start("scripted.py", &["--judge", "--log", log.to_str().unwrap()]);
    samples_jsonl(d.path());
    let yaml = judge_yaml(&server.base_url(), "    structured: true\n    max_candidates: 3\n    shuffle: false\n", "    min_repeats: 1\n");
    std::fs::write(d.path().join("pipeline.yaml"), yaml).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = one(read(&d.path().join("judged.parquet")));
    // Sample 3 of each p-prompt is over max_candidates: 4 × 1 rows dropped, counted.
    assert_eq!(t.num_rows(), (12 + 12) * 3);
    assert!(u32s(&t, "sample_idx").iter().all(|s| s.unwrap() < 3));
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    assert_eq!(stage(&run, "judged")["drops"]["over_max_candidates"], 4, "{run}");
    // Every request asked for the json_schema over the labels shown; unshuffled, position = sample_idx.
    let bodies: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|l| l.get("body").cloned())
        .collect();
    assert_eq!(bodies.len(), 24);
    for b in &bodies {
        assert_eq!(
            b["response_format"]["json_schema"]["schema"]["properties"]["ranking"]["pattern"],
            "^(A[>=]B[>=]C|A[>=]C[>=]B|B[>=]A[>=]C|B[>=]C[>=]A|C[>=]A[>=]B|C[>=]B[>=]A)$"
        );
    }
    assert_eq!(u32s(&t, "position"), u32s(&t, "sample_idx"));
    let (_, st) = rankings(&t);
    for ((id, _), s) in &st {
        assert_eq!(s, id.strip_prefix("m-").unwrap_or("ok"), "{id}");
    }
    drop(server);
}

/// A judge config error: exit 2, one located line.
fn refused(stages: &str, want: &str, line: u32) {
    let d = tempfile::tempdir().unwrap();
    samples_jsonl(d.path());
    std::fs::write(d.path().join("bad.j2"), "{{ prompt }} and only the first: {{ responses[0].text }}").unwrap();
    // Lines: 1 name, 2 models:, 3 judge:, 4 path, 5 stages:, 6-8 the source, 9 the judge's id, 10 kind, 11 input, 12 model, 13…
    let yaml = format!(
        "name: bad\nmodels:\n  judge: {}\nstages:\n  - id: samples\n    kind: source\n    path: samples.jsonl\n  - id: judged\n    kind: judge\n    input: samples\n    model: judge\n{stages}",
        root().join("data-samples/models/tiny-llama").display()
    );
    std::fs::write(d.path().join("pipeline.yaml"), yaml).unwrap();
    let o = Command::new(bin()).args(["run", "pipeline.yaml"]).current_dir(d.path()).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(want), "expected {want:?} in {err}");
    assert!(err.contains(&format!("pipeline.yaml:{line}:")), "expected line {line}: {err}");
}

#[test]
fn bad_judge_input_is_refused_at_plan_time() {
    refused("    repeats: 0\n", "`repeats` must be at least 1", 12);
    refused("    template: bad.j2\n", "does not render every response", 12);
    refused("    structured: true\n", "cannot constrain decoding", 12);
    refused("    mode: pairwise\n", "`mode: pairwise` is not implemented yet", 12);
    refused(
        "    repeats: 3\n  - id: pairs\n    kind: select\n    input: judged\n    strategy: repeat_ranking\n    min_repeats: 4\n",
        "`min_repeats: 4` is more than the 3 repeats the judge `judged` makes",
        17,
    );
}

#[test]
fn llamacpp_structured_judge_pipeline_end_to_end() {
    let policy = Server::start("llamacpp.py", &["--parallel", "2", "--alias", "policy"]);
    let judge = Server::start("llamacpp.py", &["--parallel", "2", "--alias", "judge"]);
    let store = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(root().join("pipelines/judge-repeat-ranking.yaml")).unwrap();
    let yaml = yaml
        .replace("../data-samples/", &format!("{}/data-samples/", root().display()))
        .replace("path: ../out/judge-repeat-ranking.parquet", &format!("path: {}/judge-pairs.parquet", out_dir.path().display()));
    let yaml = yaml
        .replace("    input: judged\n    strategy", "    input: judged\n    strategy")
        .replace("  - id: pairs\n", "  - id: judged_out\n    kind: export\n    input: judged\n    path: judged.parquet\n  - id: pairs\n");
    std::fs::write(out_dir.path().join("judge.yaml"), yaml).unwrap();
    let o = Command::new(bin())
        .args(["run", "judge.yaml", "--store", store.path().to_str().unwrap()])
        .current_dir(out_dir.path())
        .env("POLICY_URL", policy.base_url())
        .env("JUDGE_URL", judge.base_url())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // structured: true — every reply parses.
    let t = one(read(&out_dir.path().join("judged.parquet")));
    let status = strs(&t, "status");
    assert!(status.iter().all(|s| s.as_deref() == Some("ok")), "{:?}", strs(&t, "judgment"));
    let run: Value = serde_json::from_slice(&std::fs::read(store.path().join("run.json")).unwrap()).unwrap();
    let j = &stage(&run, "judged")["backend"]["judge"];
    assert_eq!(j["rankings"], 6 * 5, "{j}");
    assert_eq!(j["ok"], 6 * 5, "{j}");
    let pairs = read(&out_dir.path().join("judge-pairs.parquet"));
    assert!(pairs.iter().map(|b| b.num_rows()).sum::<usize>() >= 1);
}

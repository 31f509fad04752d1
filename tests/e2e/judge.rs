//! The judge stage (DESIGN §12, issue 10): the scripted judge server
//! (`scripted.py --judge`: ranks — or, pairwise, picks — by a number in each
//! response, with position bias, noise and malformed replies on marked
//! prompts), the real llama.cpp server with `structured: true`, the example
//! pipeline, a local (in-process) pairwise judge, and bad input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use arrow::array::{Array, BooleanArray, Float64Array, ListArray, StringArray, StructArray, UInt32Array};
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
    // Cast: a pairwise judge keeps the input's `sample_idx` type (int64 from JSON lines).
    let a = arrow::compute::cast(b.column_by_name(c).unwrap(), &arrow::datatypes::DataType::UInt32).unwrap();
    let a = a.as_any().downcast_ref::<UInt32Array>().unwrap();
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
    // Each mode's keys are refused in the other, at the key's line (13: after `mode:`).
    refused("    mode: pairwise\n    repeats: 3\n", "`repeats` is a `mode: listwise` key", 13);
    refused("    mode: pairwise\n    shuffle: false\n", "`shuffle` is a `mode: listwise` key", 13);
    refused("    mode: pairwise\n    max_candidates: 4\n", "`max_candidates` is a `mode: listwise` key", 13);
    refused("    max_pairs: 4\n", "`max_pairs` is a `mode: pairwise` key", 12);
    refused("    as_reward: true\n", "`as_reward` is a `mode: pairwise` key", 12);
    refused("    mode: pairwise\n    max_pairs: 0\n", "`max_pairs` must be at least 1", 13);
    // A pairwise template must render both responses (bad.j2 renders only the first).
    refused("    mode: pairwise\n    template: bad.j2\n", "does not render every response", 13);
    refused("    mode: pairwise\n    structured: true\n", "cannot constrain decoding", 13);
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

// ---- mode: pairwise ----------------------------------------------------------

/// One entry of `judge_verdicts`.
#[derive(Debug, Clone, PartialEq)]
struct V {
    opponent: u32,
    shown_first: bool,
    status: String,
    verdict: Option<String>,
    outcome: String,
    judgment: Option<String>,
}

fn verdicts(b: &RecordBatch) -> Vec<Vec<V>> {
    let l = b.column_by_name("judge_verdicts").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
    (0..l.len())
        .map(|r| {
            let v = l.value(r);
            let st = v.as_any().downcast_ref::<StructArray>().unwrap();
            let t = |c: &str| st.column_by_name(c).unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
            let opp = st.column_by_name("opponent_idx").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().clone();
            let first = st.column_by_name("shown_first").unwrap().as_any().downcast_ref::<BooleanArray>().unwrap().clone();
            let (status, verdict, outcome, judgment) = (t("status"), t("verdict"), t("outcome"), t("judgment"));
            let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
            (0..st.len())
                .map(|i| V {
                    opponent: opp.value(i),
                    shown_first: first.value(i),
                    status: status.value(i).to_string(),
                    verdict: opt(&verdict, i),
                    outcome: outcome.value(i).to_string(),
                    judgment: opt(&judgment, i),
                })
                .collect()
        })
        .collect()
}

fn f64s(b: &RecordBatch, c: &str) -> Vec<Option<f64>> {
    let a = b.column_by_name(c).unwrap().as_any().downcast_ref::<Float64Array>().unwrap();
    (0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i))).collect()
}

/// Pairwise samples: (prompt_id, prompt, qualities); the response of sample s
/// is "An answer of quality q, sample s." + s × " More." (longer with s).
fn pairwise_jsonl(dir: &Path, prompts: &[(&str, &str, &[i64])]) {
    let mut lines = String::new();
    for (id, prompt, qs) in prompts {
        for (s, q) in qs.iter().enumerate() {
            let r = serde_json::json!({"prompt_id": id, "prompt": prompt, "sample_idx": s, "response": format!("An answer of quality {q}, sample {s}.{}", " More.".repeat(s))});
            lines.push_str(&format!("{r}\n"));
        }
    }
    std::fs::write(dir.join("samples.jsonl"), lines).unwrap();
}

fn pairwise_yaml(url: &str, judge_extra: &str, rest: &str) -> String {
    format!(
        "name: pairwise-test
chunk_size: 2
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
    mode: pairwise
    max_tokens: 64
{judge_extra}  - id: out
    kind: export
    input: judged
    path: judged.parquet
{rest}"
    )
}

/// The server's pairwise answers: (text shown as A, text shown as B) → the logged line
/// (a test's responses are distinct across prompts, so the texts name the request).
fn pairwise_log(log: &Path) -> HashMap<(String, String), Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l.get("pairwise").is_some())
        .map(|l| ((l["first"].as_str().unwrap().to_string(), l["second"].as_str().unwrap().to_string()), l))
        .collect()
}

#[test]
fn scripted_pairwise_judge_output_is_what_the_server_answered() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("server.log");
    // Default position bias 1.5 > noise 1: two samples of equal quality are each preferred when
    // shown first, so (p0: 0,1) and (p1: 1,2) are inconsistent whatever the noise.
    let server = Server::start("scripted.py", &["--judge", "--log", log.to_str().unwrap()]);
    pairwise_jsonl(
        d.path(),
        &[
            ("p0", "Question 0?", &[10, 10, 20, 30]),
            ("p1", "Question 1?", &[25, 11, 11, 40]),
            ("p2", "Question 2?", &[5, 50, 6]),
            ("m-no_verdict", "Question MALFORMED:no_verdict", &[1, 2, 3]),
            ("m-conflicting_verdicts", "Question MALFORMED:conflicting_verdicts", &[4, 5, 6]),
        ],
    );
    std::fs::write(d.path().join("pipeline.yaml"), pairwise_yaml(&server.base_url(), "", "")).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = one(read(&d.path().join("judged.parquet")));
    // Every input row, in input order.
    assert_eq!(t.num_rows(), 17);
    let (ids, idx, resp) = (strs(&t, "prompt_id"), u32s(&t, "sample_idx"), strs(&t, "response"));
    let n_of = |id: &str| ids.iter().filter(|x| x.as_deref() == Some(id)).count();
    let text: HashMap<(String, u32), String> =
        (0..t.num_rows()).map(|i| ((ids[i].clone().unwrap(), idx[i].unwrap()), resp[i].clone().unwrap())).collect();
    let logged = pairwise_log(&log);
    // Both orders of every pair: 2 × (6 + 6 + 3 + 3 + 3).
    assert_eq!(logged.len(), 42);

    let vs = verdicts(&t);
    let (wr, comps, inc) = (f64s(&t, "judge_winrate"), u32s(&t, "judge_comparisons"), u32s(&t, "judge_inconsistent"));
    let mut inconsistent_pairs = 0;
    for i in 0..t.num_rows() {
        let (id, me) = (ids[i].clone().unwrap(), idx[i].unwrap());
        let mine = &text[&(id.clone(), me)];
        // Two entries per opponent: shown first, then shown second.
        let want: Vec<(u32, bool)> = (0..n_of(&id) as u32).filter(|&o| o != me).flat_map(|o| [(o, true), (o, false)]).collect();
        assert_eq!(vs[i].iter().map(|v| (v.opponent, v.shown_first)).collect::<Vec<_>>(), want, "{id}/{me}");
        // wins counts a consistent tie as ½.
        let (mut wins, mut consistent, mut inconsistent) = (0.0, 0, 0);
        for pair in vs[i].chunks(2) {
            let theirs = &text[&(id.clone(), pair[0].opponent)];
            // Each entry is exactly what the server answered for that (prompt, pair, order).
            let mut won = Vec::new();
            for v in pair {
                let key = if v.shown_first { (mine.clone(), theirs.clone()) } else { (theirs.clone(), mine.clone()) };
                let l = &logged[&key];
                assert_eq!(v.judgment.as_deref(), l["reply"].as_str(), "{id}/{me}");
                assert_eq!(v.status, l["kind"].as_str().unwrap(), "{id}/{me}");
                assert_eq!(v.verdict.as_deref(), l["verdict"].as_str(), "{id}/{me}");
                // From this sample's side: 1 won, 0 lost, ½ tie.
                won.push(v.verdict.as_deref().map(|x| match (x, v.shown_first) {
                    ("C", _) => 0.5,
                    ("A", true) | ("B", false) => 1.0,
                    _ => 0.0,
                }));
            }
            let want_outcome = match (won[0], won[1]) {
                (Some(a), Some(b)) if a != b => "inconsistent",
                (Some(1.0), Some(_)) => "win",
                (Some(0.5), Some(_)) => "tie",
                (Some(_), Some(_)) => "loss",
                _ => "failed",
            };
            assert!(pair.iter().all(|v| v.outcome == want_outcome), "{id}/{me}: {pair:?}");
            match want_outcome {
                "inconsistent" => inconsistent += 1,
                "failed" => {}
                _ => {
                    consistent += 1;
                    wins += won[0].unwrap();
                }
            }
            inconsistent_pairs += (want_outcome == "inconsistent") as u32;
        }
        // judge_winrate = (wins + ½ ties) / consistent comparisons; null with none.
        assert_eq!(wr[i], (consistent > 0).then(|| wins / consistent as f64), "{id}/{me}");
        assert_eq!(comps[i], Some(consistent), "{id}/{me}");
        assert_eq!(inc[i], Some(inconsistent), "{id}/{me}");
        if id.starts_with("m-") {
            let reason = id.strip_prefix("m-").unwrap();
            assert!(vs[i].iter().all(|v| v.status == reason && v.verdict.is_none() && v.judgment.is_some()), "{id}: {:?}", vs[i]);
        } else {
            assert!(vs[i].iter().all(|v| v.status == "ok"), "{id}/{me}");
        }
    }
    // Each inconsistent pair was seen from both samples.
    let j_inc: u32 = inc.iter().map(|x| x.unwrap()).sum();
    assert_eq!(j_inc, inconsistent_pairs);
    assert!(j_inc >= 2 * 2, "the equal-quality pairs are inconsistent: {j_inc}");

    // run.json: failures by reason, and the bias figures recomputed from the server's log.
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    let j = &stage(&run, "judged")["backend"]["judge"];
    assert_eq!(j["mode"], "pairwise", "{j}");
    assert_eq!(j["judgments"], 42, "{j}");
    assert_eq!(j["comparisons"], 21, "{j}");
    assert_eq!(j["ok"], 30, "{j}");
    assert_eq!(j["parse_failures"], serde_json::json!({"no_verdict": 6, "conflicting_verdicts": 6}), "{j}");
    assert_eq!(j["inconsistent"], j_inc / 2, "{j}");
    assert_eq!(j["failed"], 6, "{j}");
    assert_eq!(j["over_max_pairs"], 0, "{j}");
    let ok: Vec<&Value> = logged.values().filter(|l| l["kind"] == "ok").collect();
    let count = |v: &str| ok.iter().filter(|l| l["verdict"] == v).count() as f64;
    assert_eq!(j["first_shown_win_rate"].as_f64(), Some(count("A") / (count("A") + count("B"))), "{j}");
    assert_eq!(j["tie_rate"].as_f64(), Some(count("C") / ok.len() as f64), "{j}");
    let decided: Vec<(usize, usize, &str)> = ok
        .iter()
        .filter(|l| l["verdict"] != "C")
        .map(|l| (l["first"].as_str().unwrap().len(), l["second"].as_str().unwrap().len(), l["verdict"].as_str().unwrap()))
        .filter(|(a, b, _)| a != b)
        .collect();
    let longer = decided.iter().filter(|(a, b, v)| (a > b) == (*v == "A")).count() as f64;
    assert_eq!(j["longer_response_pairs"], decided.len(), "{j}");
    assert_eq!(j["longer_response_win_rate"].as_f64(), Some(longer / decided.len() as f64), "{j}");
    drop(server);
}

#[test]
fn scripted_pairwise_judge_hand_checked_win_rates_max_pairs_and_as_reward() {
    // No noise, position bias 2, tie margin 2: for qualities x, y and d = x − y, x shown first
    // scores x + 2 vs y → A if d > 0, C if −4 ≤ d ≤ 0; y shown first → A (y) if d < 0, C if
    // 0 ≤ d ≤ 4. So |d| ≥ 5: the better wins both orders; d = 0: a tie in both; 1 ≤ |d| ≤ 4:
    // the orders disagree (inconsistent).
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("server.log");
    let server = Server::start(
        "scripted.py",
        &["--judge", "--judge-position-bias", "2", "--judge-noise", "0", "--judge-tie-margin", "2", "--log", log.to_str().unwrap()],
    );
    pairwise_jsonl(
        d.path(),
        &[
            ("h0", "Question h0?", &[10, 20, 20, 13]),
            ("h1", "Question h1?", &[5, 5, 30]),
            ("h2", "Question h2?", &[7, 9]),
            ("h3", "Question h3?", &[10, 20, 30, 40, 50]),
        ],
    );
    let select = "  - id: pairs\n    kind: select\n    input: judged\n    strategy: max_min\n  - id: pairs_out\n    kind: export\n    input: pairs\n    path: pairs.parquet\n";
    let yaml = pairwise_yaml(&server.base_url(), "    max_pairs: 6\n    as_reward: true\n", select);
    std::fs::write(d.path().join("pipeline.yaml"), &yaml).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = one(read(&d.path().join("judged.parquet")));
    let (wr, comps, inc) = (f64s(&t, "judge_winrate"), u32s(&t, "judge_comparisons"), u32s(&t, "judge_inconsistent"));
    // h0 (10, 20, 20, 13): (0,1) d=−10 → 1 wins; (0,2) → 2 wins; (0,3) d=−3 → inconsistent;
    //   (1,2) d=0 → tie; (1,3) d=7 → 1 wins; (2,3) → 2 wins.
    //   s0: 0 of 2 = 0; s1: (1 + ½ + 1)/3 = 5/6; s2: 5/6; s3: 0 of 2 = 0; s0 and s3 one inconsistent each.
    // h1 (5, 5, 30): (0,1) tie; (0,2), (1,2) → 2 wins. s0 = s1 = ½/2 = 0.25; s2 = 2/2 = 1.
    // h2 (7, 9): d = −2 → inconsistent: no consistent comparison, win rate null.
    let want_wr = [Some(0.0), Some(2.5 / 3.0), Some(2.5 / 3.0), Some(0.0), Some(0.25), Some(0.25), Some(1.0), None, None];
    assert_eq!(&wr[..9], &want_wr);
    assert_eq!(&comps[..9], &[2, 3, 3, 2, 2, 2, 2, 0, 0].map(Some));
    assert_eq!(&inc[..9], &[1, 0, 0, 1, 0, 0, 0, 1, 1].map(Some));
    // as_reward: reward = judge_winrate.
    assert_eq!(f64s(&t, "reward"), wr);
    // h3: 5 samples, 10 pairs > max_pairs 6: six distinct pairs, every sample in at least one
    // (DESIGN §12's circulant draw: a cap ≥ n covers every sample), all consistent (|d| ≥ 10),
    // so each win rate is the share of its drawn opponents with lower quality.
    let vs = verdicts(&t);
    let mut pairs = HashSet::new();
    for (s, v) in vs[9..].iter().enumerate() {
        assert!(!v.is_empty() && v.len() % 2 == 0, "h3/{s}: {v:?}");
        let opps: Vec<u32> = v.iter().step_by(2).map(|e| e.opponent).collect();
        for &o in &opps {
            pairs.insert((s.min(o as usize), s.max(o as usize)));
        }
        let won = opps.iter().filter(|&&o| (o as usize) < s).count() as f64;
        assert_eq!(wr[9 + s], Some(won / opps.len() as f64), "h3/{s}");
        assert_eq!(inc[9 + s], Some(0));
    }
    assert_eq!(pairs.len(), 6, "{pairs:?}");
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    let j = &stage(&run, "judged")["backend"]["judge"];
    assert_eq!(j["over_max_pairs"], 4, "{j}");
    assert_eq!(j["comparisons"], 6 + 3 + 1 + 6, "{j}");
    // Ties: h0 (1,2) and h1 (0,1); inconsistent: h0 (0,3) and h2 (0,1).
    assert_eq!((j["ties"].clone(), j["inconsistent"].clone(), j["consistent"].clone()), (2.into(), 2.into(), 14.into()), "{j}");
    assert_eq!(j["inconsistent_rate"].as_f64(), Some(2.0 / 16.0), "{j}");
    // max_min over reward = win rate: h0 chosen 1 (5/6; tied with 2, lowest sample_idx), rejected 0
    // (0, tied with 3); h1 chosen 2, rejected 0; h2 has no finite reward: no pair.
    let p = one(read(&d.path().join("pairs.parquet")));
    let pid = strs(&p, "prompt_id");
    let at = |id: &str| pid.iter().position(|x| x.as_deref() == Some(id));
    let (ci, ri) = (u32s(&p, "chosen_idx"), u32s(&p, "rejected_idx"));
    assert_eq!((ci[at("h0").unwrap()], ri[at("h0").unwrap()]), (Some(1), Some(0)));
    assert_eq!((ci[at("h1").unwrap()], ri[at("h1").unwrap()]), (Some(2), Some(0)));
    assert_eq!(at("h2"), None);
    // The pairs table does not carry the per-sample judge columns.
    assert!(p.schema().fields().iter().all(|f| !f.name().starts_with("judge_")), "{:?}", p.schema());

    // Same seed, fresh store: the same pairs are drawn (and answered from nothing but the server).
    let store2 = d.path().join("store2");
    let o = run_in(d.path(), &store2);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(verdicts(&one(read(&d.path().join("judged.parquet")))), vs);
    drop(server);
}

#[test]
fn scripted_pairwise_judge_structured() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("server.log");
    let server = Server::start("scripted.py", &["--judge", "--log", log.to_str().unwrap()]);
    pairwise_jsonl(
        d.path(),
        &[
            ("p0", "Question 0?", &[10, 40, 20]),
            ("m-no_verdict", "Question MALFORMED:no_verdict", &[1, 2]),
            ("m-conflicting_verdicts", "Question MALFORMED:conflicting_verdicts", &[3, 4]),
        ],
    );
    std::fs::write(d.path().join("pipeline.yaml"), pairwise_yaml(&server.base_url(), "    structured: true\n", "")).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    // Every request asked for the verdict schema: only "A", "B", "C".
    let bodies: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|l| l.get("body").cloned())
        .collect();
    assert_eq!(bodies.len(), 2 * (3 + 1 + 1));
    for b in &bodies {
        assert_eq!(b["response_format"]["json_schema"]["schema"]["properties"]["verdict"]["enum"], serde_json::json!(["A", "B", "C"]));
    }
    let t = one(read(&d.path().join("judged.parquet")));
    let (ids, idx, resp) = (strs(&t, "prompt_id"), u32s(&t, "sample_idx"), strs(&t, "response"));
    let logged = pairwise_log(&log);
    let text: HashMap<(String, u32), String> =
        (0..t.num_rows()).map(|i| ((ids[i].clone().unwrap(), idx[i].unwrap()), resp[i].clone().unwrap())).collect();
    for (i, vs) in verdicts(&t).iter().enumerate() {
        let id = ids[i].clone().unwrap();
        let mine = &text[&(id.clone(), idx[i].unwrap())];
        for v in vs {
            let theirs = &text[&(id.clone(), v.opponent)];
            let key = if v.shown_first { (mine.clone(), theirs.clone()) } else { (theirs.clone(), mine.clone()) };
            assert_eq!(v.judgment.as_deref(), logged[&key]["reply"].as_str());
            assert_eq!(v.verdict.as_deref(), logged[&key]["verdict"].as_str());
            // A JSON reply cannot name two verdicts: both malformed kinds are `no_verdict`.
            assert_eq!(v.status, if id.starts_with("m-") { "no_verdict" } else { "ok" }, "{id}");
        }
    }
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    let j = &stage(&run, "judged")["backend"]["judge"];
    assert_eq!(j["parse_failures"], serde_json::json!({"no_verdict": 4}), "{j}");
    assert_eq!(j["ok"], 6, "{j}");
    drop(server);
}

#[test]
fn pairwise_on_a_prompt_with_one_sample_is_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("server.log");
    let server = Server::start("scripted.py", &["--judge", "--log", log.to_str().unwrap()]);
    pairwise_jsonl(d.path(), &[("p0", "Question 0?", &[10, 20]), ("solo", "Question solo?", &[10]), ("p2", "Question 2?", &[1, 2])]);
    let yaml = pairwise_yaml(&server.base_url(), "", "").replace("chunk_size: 2", "chunk_size: 8");
    std::fs::write(d.path().join("pipeline.yaml"), yaml).unwrap();
    let o = run_in(d.path(), &d.path().join("store"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    // One error line (after the progress lines of the stages that ran), naming stage, input and prompt.
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one line: {err}");
    assert_eq!(err.trim_end().lines().last(), Some(errors[0]), "{err}");
    assert!(errors[0].contains("stage `judged`: input `samples`: prompt `solo` has only 1 sample"), "{err}");
    // Checked before any request is sent; nothing is written.
    let judged = std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.contains("\"pairwise\"")).count();
    assert_eq!(judged, 0);
    assert!(!d.path().join("judged.parquet").exists());
    drop(server);
}

#[test]
fn local_pairwise_judge_runs_in_process() {
    // SmolLM2-135M-Instruct (GGUF) in-process: the judge seam is the same as for a server.
    // Whether a 135M model writes [[A]] is its business; every reply is kept and classified.
    let d = tempfile::tempdir().unwrap();
    pairwise_jsonl(d.path(), &[("p0", "What is 2 + 2?", &[4, 5])]);
    let yaml = format!(
        "name: local-pairwise\nmodels:\n  smol: {}\nstages:\n  - id: samples\n    kind: source\n    path: samples.jsonl\n  - id: judged\n    kind: judge\n    input: samples\n    model: smol\n    mode: pairwise\n    max_tokens: 12\n  - id: out\n    kind: export\n    input: judged\n    path: judged.parquet\n",
        crate::servers::smollm2().display()
    );
    std::fs::write(d.path().join("pipeline.yaml"), yaml).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = one(read(&d.path().join("judged.parquet")));
    let vs = verdicts(&t);
    assert_eq!(vs.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
    for v in vs.iter().flatten() {
        assert!(["ok", "no_verdict", "conflicting_verdicts"].contains(&v.status.as_str()), "{v:?}");
        assert!(v.judgment.as_deref().is_some_and(|j| !j.is_empty()), "{v:?}");
    }
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    let j = &stage(&run, "judged")["backend"]["judge"];
    assert_eq!(j["judgments"], 2, "{run}");
}

#[test]
fn llamacpp_structured_pairwise_judge_end_to_end() {
    let policy = Server::start("llamacpp.py", &["--parallel", "2", "--alias", "policy"]);
    let judge = Server::start("llamacpp.py", &["--parallel", "2", "--alias", "judge"]);
    let d = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: llamacpp-pairwise
seed: 0
chunk_size: 2
models:
  policy:
    backend: openai
    server: llamacpp
    base_url: {}
    model: policy
  judge:
    backend: openai
    server: llamacpp
    base_url: {}
    model: judge
stages:
  - id: prompts
    kind: source
    path: {}/data-samples/prompts.jsonl
    dedup: true
    limit: 3
  - id: samples
    kind: generate
    input: prompts
    model: policy
    n: 3
    temperature: 0.8
    max_new_tokens: 24
    chat_template: true
  - id: judged
    kind: judge
    input: samples
    model: judge
    mode: pairwise
    structured: true
    max_tokens: 96            # the grammar allows up to 20 whitespace chars at each of 4 places; 16 once cut a reply short
    as_reward: true
  - id: judged_out
    kind: export
    input: judged
    path: judged.parquet
  - id: pairs
    kind: select
    input: judged
    strategy: max_min
  - id: export
    kind: export
    input: pairs
    path: pairs.parquet
    format: trl
",
        policy.base_url(),
        judge.base_url(),
        root().display()
    );
    std::fs::write(d.path().join("pipeline.yaml"), yaml).unwrap();
    let store = d.path().join("store");
    let o = run_in(d.path(), &store);
    assert!(o.status.success(), "{}", stderr(&o));
    // structured: true — every reply is one of the three verdicts.
    let t = one(read(&d.path().join("judged.parquet")));
    for v in verdicts(&t).iter().flatten() {
        assert_eq!(v.status, "ok", "{v:?}");
        assert!(["A", "B", "C"].contains(&v.verdict.as_deref().unwrap()), "{v:?}");
    }
    let run: Value = serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap();
    let j = &stage(&run, "judged")["backend"]["judge"];
    assert_eq!(j["judgments"], 3 * 3 * 2, "{j}");
    assert_eq!(j["ok"], 3 * 3 * 2, "{j}");
    assert_eq!(f64s(&t, "reward"), f64s(&t, "judge_winrate"));
}

//! Conversations through the stages (issue 16 acceptance 1): a `messages`
//! table read by `source`, then `logprob`, `score` and `train` on the tiny
//! models with real chat templates, against tests/golden/chat/*.json
//! (tests/reference/chat_golden.py: TRL 1.16 DPOTrainer tokenisation,
//! transformers log-probs and rewards, DPOTrainer.compute_loss for step 1).

use std::path::Path;

use arrow::array::{Array, Float64Array, StringArray, UInt32Array};
use serde_json::{json, Value};

use crate::common::{ok, prefpipe, read, root};

fn golden(family: &str) -> Value {
    serde_json::from_slice(&std::fs::read(root().join(format!("tests/golden/chat/{family}.json"))).unwrap()).unwrap()
}

/// Within 1e-4 relative (f32 candle vs transformers).
fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{what}: prefpipe {got} vs TRL/transformers {want}");
}

fn f64s(path: &Path, name: &str) -> Vec<f64> {
    read(path)
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name(name).unwrap_or_else(|| panic!("no {name}")).as_any().downcast_ref::<Float64Array>().unwrap().clone();
            (0..c.len()).map(move |i| c.value(i)).collect::<Vec<_>>()
        })
        .collect()
}

fn run_family(family: &str) {
    let g = golden(family);
    let dir = tempfile::tempdir().unwrap();
    let models = root().join("data-samples/models");
    // One row per (example, side) for logprob/score; one pair per example for train.
    let mut rows = String::new();
    let mut pairs = String::new();
    let mut want = Vec::new();
    for (i, ex) in g["examples"].as_array().unwrap().iter().enumerate() {
        let messages = &ex["messages"];
        for side in ["chosen", "rejected"] {
            let row = json!({"prompt_id": format!("e{i}"), "messages": messages, "sample_idx": if side == "chosen" {0} else {1}, "response": ex[side]["text"]});
            rows.push_str(&format!("{row}\n"));
            want.push(&ex[side]);
        }
        let pair =
            json!({"prompt_id": format!("e{i}"), "messages": messages, "chosen": ex["chosen"]["text"], "rejected": ex["rejected"]["text"]});
        pairs.push_str(&format!("{pair}\n"));
    }
    std::fs::write(dir.path().join("rows.jsonl"), rows).unwrap();
    std::fs::write(dir.path().join("pairs.jsonl"), pairs).unwrap();
    let m = |k: &str| models.join(Path::new(g[k].as_str().unwrap()).file_name().unwrap()).display().to_string();
    let n = g["examples"].as_array().unwrap().len();
    let yaml = format!(
        "name: chat-{family}
models:
  policy: {policy}
  reference: {reference}
  rm: {rm}
stages:
  - {{id: rows, kind: source, path: rows.jsonl}}
  - {{id: lp, kind: logprob, input: rows, model: policy, reference: reference, chat_template: true}}
  - id: scored
    kind: score
    input: rows
    reward_models:
      - {{name: rm, model: rm, chat_template: true}}
  - {{id: pairs, kind: source, path: pairs.jsonl}}
  - id: dpo
    kind: train
    input: pairs
    method: dpo
    model: policy
    reference: reference
    beta: {beta}
    lr: 1.0e-6
    batch_size: {n}
    max_steps: 1
    shuffle: false
    chat_template: true
    output: ckpt
    metrics: metrics.parquet
  - {{id: e1, kind: export, input: lp, path: lp.parquet}}
  - {{id: e2, kind: export, input: scored, path: scored.parquet}}
",
        policy = m("policy"),
        reference = m("reference"),
        rm = m("reward_model"),
        beta = g["beta"]
    );
    std::fs::write(dir.path().join("pipeline.yaml"), yaml).unwrap();
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));

    let lp = dir.path().join("lp.parquet");
    let (policy, reference) = (f64s(&lp, "logp_policy"), f64s(&lp, "logp_reference"));
    let b = &read(&lp)[0];
    let n_tokens = b.column_by_name("n_tokens").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap();
    let prompts = b.column_by_name("prompt").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    let rewards = f64s(&dir.path().join("scored.parquet"), "reward_rm");
    assert_eq!(policy.len(), want.len());
    for (r, w) in want.iter().enumerate() {
        close(policy[r], w["logp_policy"].as_f64().unwrap(), &format!("{family} row {r} logp_policy"));
        close(reference[r], w["logp_reference"].as_f64().unwrap(), &format!("{family} row {r} logp_reference"));
        // n_tokens counts TRL's response ids (the template's end-of-turn tokens, no EOS added).
        assert_eq!(u64::from(n_tokens.value(r)), w["n_tokens"].as_u64().unwrap(), "{family} row {r}");
        close(rewards[r], w["reward"].as_f64().unwrap(), &format!("{family} row {r} reward"));
    }
    // `prompt` holds the last user turn's text (DESIGN §15).
    let first = &g["examples"][0]["messages"];
    let last_user = first.as_array().unwrap().iter().rev().find(|m| m["role"] == "user").unwrap()["content"].as_str().unwrap();
    assert_eq!(prompts.value(0), last_user);
    // Step 1's loss is DPOTrainer.compute_loss on the same batch.
    let loss = f64s(&dir.path().join("metrics.parquet"), "loss");
    close(loss[0], g["dpo_step1"]["loss"].as_f64().unwrap(), &format!("{family} DPO step-1 loss"));
}

#[test]
fn qwen3_conversations_through_the_stages_equal_trl() {
    run_family("qwen3");
}

#[test]
fn llama31_conversations_through_the_stages_equal_trl() {
    run_family("llama31");
}

#[test]
fn qwen25_conversations_through_the_stages_equal_trl() {
    run_family("qwen25");
}

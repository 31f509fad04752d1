//! Model-backed stages end to end: generate / logprob / ches on the tiny
//! fixtures in data-samples/models (real loading code, no network).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{bin, ok, prefpipe, root, stderr};

fn fixture(name: &str) -> PathBuf {
    root().join("data-samples/models").join(name)
}

/// A copy of a fixture model that a test may break.
fn copy_model(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn pipeline(model: &Path, extra: &str) -> String {
    format!(
        "name: gen
seed: 11
chunk_size: 2
stages:
  - id: prompts
    kind: source
    path: {prompts}
    dedup: true
    limit: 12
  - id: samples
    kind: generate
    input: prompts
    model: {model}
    n: 3
    temperature: 0.9
    top_k: 50
    max_new_tokens: 12{extra}
  - id: export
    kind: export
    input: samples
    path: samples.jsonl
    format: jsonl
",
        prompts = root().join("data-samples/prompts.jsonl").display(),
        model = model.display()
    )
}

#[test]
fn generation_does_not_depend_on_batch_or_chunk_size() {
    let mut outputs = Vec::new();
    for (bs, chunk) in [(1, 2), (4, 2), (16, 5)] {
        let dir = tempfile::tempdir().unwrap();
        let yaml =
            pipeline(&fixture("tiny-llama"), &format!("\n    batch_size: {bs}")).replace("chunk_size: 2", &format!("chunk_size: {chunk}"));
        std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
        ok(prefpipe(dir.path(), &["run", "p.yaml"]));
        outputs.push(std::fs::read_to_string(dir.path().join("samples.jsonl")).unwrap());
    }
    // 12 prompts × n = 3.
    assert_eq!(outputs[0].lines().count(), 36);
    assert_eq!(outputs[0], outputs[1], "batch size 1 vs 4");
    assert_eq!(outputs[0], outputs[2], "batch size 1 vs 16, chunk size 2 vs 5");
    // Different samples of one prompt differ (the seed includes sample_idx).
    let rows: Vec<serde_json::Value> = outputs[0].lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows[0]["response"] != rows[1]["response"] || rows[1]["response"] != rows[2]["response"]);
    assert_eq!(rows[2]["sample_idx"], 2);
}

#[test]
fn kill_9_during_generate_resumes_to_identical_output() {
    let clean = tempfile::tempdir().unwrap();
    std::fs::write(clean.path().join("p.yaml"), pipeline(&fixture("tiny-llama"), "")).unwrap();
    ok(prefpipe(clean.path(), &["run", "p.yaml"]));
    let expected = std::fs::read(clean.path().join("samples.jsonl")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), pipeline(&fixture("tiny-llama"), "")).unwrap();
    let chunks_done = |d: &Path| -> usize {
        let Ok(rd) = std::fs::read_dir(d.join(".prefpipe/stages")) else { return 0 };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("samples-"))
            .map(|e| {
                std::fs::read_dir(e.path()).unwrap().flatten().filter(|f| f.file_name().to_string_lossy().ends_with(".parquet")).count()
            })
            .sum()
    };
    let mut child =
        Command::new(bin()).args(["run", "p.yaml"]).current_dir(dir.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // A deadline so a hung run cannot hang the suite (not a speed check).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut killed = false;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if chunks_done(dir.path()) >= 2 {
            child.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait().unwrap();
    assert!(killed, "generation finished before it could be killed");
    assert!(!dir.path().join("samples.jsonl").exists());
    let o = prefpipe(dir.path(), &["run", "p.yaml", "--log-format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("\"status\":\"resumed\""), "{}", stderr(&o));
    assert_eq!(std::fs::read(dir.path().join("samples.jsonl")).unwrap(), expected);
}

/// Runs a generate pipeline on a broken model copy; returns stderr after
/// checking exit 2 and that nothing was written.
fn broken(model: &Path) -> String {
    let dir = model.parent().unwrap();
    std::fs::write(dir.join("p.yaml"), pipeline(model, "")).unwrap();
    let o = prefpipe(dir, &["run", "p.yaml"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains("p.yaml:13:12: stage `samples`:"), "located at `model:`: {e}");
    assert!(!dir.join("samples.jsonl").exists());
    e
}

#[test]
fn bad_models_are_rejected_before_running() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory that does not exist.
    let e = broken(&tmp.path().join("nope"));
    assert!(e.contains("no such model directory"), "{e}");

    // Weights only as a pickle checkpoint.
    let m = copy_model("tiny-llama", &tmp.path().join("pickle"));
    std::fs::rename(m.join("model.safetensors"), m.join("pytorch_model.bin")).unwrap();
    let e = broken(&m);
    assert!(e.contains("pickle") && e.contains("safetensors"), "{e}");

    // An architecture prefpipe does not run.
    let m = copy_model("tiny-llama", &tmp.path().join("arch"));
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel")
        .replace("\"llama\"", "\"gpt2\"");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let e = broken(&m);
    assert!(e.contains("unsupported") && e.contains("GPT2LMHeadModel"), "{e}");

    // A tokenizer with more tokens than the model's vocabulary.
    let m = copy_model("tiny-llama", &tmp.path().join("vocab"));
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = 100.into();
    std::fs::write(m.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let e = broken(&m);
    assert!(e.contains("vocab"), "{e}");

    // Missing tokenizer.json.
    let m = copy_model("tiny-llama", &tmp.path().join("notok"));
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    let e = broken(&m);
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn prompts_longer_than_the_context_are_counted_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("tiny-llama", tmp.path());
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 24.into();
    std::fs::write(m.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    std::fs::write(tmp.path().join("p.yaml"), pipeline(&m, "")).unwrap();
    let o = prefpipe(tmp.path(), &["run", "p.yaml", "--log-format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join(".prefpipe/run.json")).unwrap()).unwrap();
    let s = run["stages"].as_array().unwrap().iter().find(|s| s["id"] == "samples").unwrap();
    let dropped = s["drops"]["prompt_too_long"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "{s}");
    assert_eq!(s["rows_out"].as_u64().unwrap(), (12 - dropped) * 3, "{s}");
}

//! Conversations end to end (DESIGN §15, issue 16): `messages` sources with
//! a trailing assistant turn stripped, sharded sources in TRL's
//! implicit-prompt format, `messages` carried through `select`, `trl_chat`
//! exports that TRL trains on unchanged, and bad conversations rejected with
//! the file and row (exit 2, one line, no output).

use std::path::Path;

use arrow::record_batch::RecordBatch;
use prefpipe_core::table::{self, Conversations};

use crate::common::{files_under, ok, prefpipe, read, root, stderr, stdout};

/// A temp dir with `out/`, the given files and `pipeline.yaml`.
fn setup(yaml: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::write(dir.path().join("pipeline.yaml"), yaml.replace("ROOT", &root().display().to_string())).unwrap();
    dir
}

fn run(dir: &Path) -> String {
    ok(prefpipe(dir, &["run", "pipeline.yaml"]))
}

fn one(path: &Path) -> RecordBatch {
    let batches = read(path);
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Column `name` as (role, content) lists, one per row.
fn convs(b: &RecordBatch, name: &str) -> Vec<Vec<(String, String)>> {
    let c = Conversations::of(b, name).unwrap();
    (0..c.len()).map(|r| c.row(r).iter().map(|m| (m.role.to_string(), m.content.to_string())).collect()).collect()
}

fn m(role: &str, content: &str) -> (String, String) {
    (role.to_string(), content.to_string())
}

fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
    table::str_col(b, name).unwrap().iter().map(|x| x.unwrap().to_string()).collect()
}

const SHARDS_TO_TRL_CHAT: &str = "name: shards
stages:
  - id: pairs
    kind: source
    path: ROOT/data-samples/chat-shards/data/train-*.parquet
  - id: chat
    kind: export
    input: pairs
    path: out/pairs.parquet
    format: trl_chat
  - id: chat_jsonl
    kind: export
    input: pairs
    path: out/pairs.jsonl
    format: trl_chat
";

#[test]
fn sharded_implicit_prompt_pairs_export_as_trl_chat() {
    let dir = setup(SHARDS_TO_TRL_CHAT, &[]);
    run(dir.path());
    let b = one(&dir.path().join("out/pairs.parquet"));
    // data-samples/make_chat_samples.py: 10 pairs over 2 shards, read in name order.
    assert_eq!(b.num_rows(), 10);
    let names: Vec<String> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["prompt", "chosen", "rejected"]);
    let prompts = convs(&b, "prompt");
    assert_eq!(
        prompts[0],
        [m("system", "You are a helpful assistant. Keep answers short."), m("user", "What is the boiling point of water at sea level?")]
    );
    // History is kept: the shared turns of chosen and rejected (TRL's extract_prompt).
    assert_eq!(prompts[1], [m("user", "Name a large desert."), m("assistant", "The Sahara."), m("user", "Where is it?")]);
    assert_eq!(convs(&b, "chosen")[1], [m("assistant", "In North Africa.")]);
    assert_eq!(convs(&b, "rejected")[1], [m("assistant", "In South America.")]);
    // The second shard's first pair comes sixth.
    assert_eq!(prompts[5].last().unwrap().1, "Give an example with a condition.");
    let jsonl = std::fs::read_to_string(dir.path().join("out/pairs.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().nth(1).unwrap()).unwrap();
    assert_eq!(first["prompt"][1], serde_json::json!({"role": "assistant", "content": "The Sahara."}));
    assert_eq!(first["chosen"], serde_json::json!([{"role": "assistant", "content": "In North Africa."}]));
}

#[test]
fn ultrafeedback_style_messages_are_stripped_and_get_a_system_turn() {
    let yaml = "name: uf
stages:
  - id: prompts
    kind: source
    path: ROOT/data-samples/chat.jsonl
    strip_trailing_assistant: true
    system_prompt: You are a careful assistant.
  - id: out
    kind: export
    input: prompts
    path: out/prompts.parquet
";
    let dir = setup(yaml, &[]);
    run(dir.path());
    let b = one(&dir.path().join("out/prompts.parquet"));
    assert_eq!(b.num_rows(), 20);
    assert_eq!(b.schema().field_with_name("messages").unwrap().data_type(), &table::messages_type());
    let c = convs(&b, "messages");
    let prompts = strings(&b, "prompt");
    for (conv, prompt) in c.iter().zip(&prompts) {
        assert_eq!(conv[0].0, "system");
        assert_eq!(conv.last().unwrap(), &m("user", prompt), "prompt = the last user turn");
    }
    // Row 1 had its own system turn; row 2 had none; row 5 keeps two earlier turns of history.
    assert_eq!(c[0][0].1, "You are a helpful assistant. Keep answers short.");
    assert_eq!(c[1], [m("system", "You are a careful assistant."), m("user", "Who wrote the novel Frankenstein?")]);
    assert_eq!(c[4].len(), 6);
    let ids = strings(&b, "prompt_id");
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 20);
}

/// A scored table whose prompts are conversations: 2 prompts × 3 samples.
fn scored_chat() -> String {
    let mut s = String::new();
    let prompts = [
        (
            "c0",
            r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]"#,
        ),
        ("c1", r#"[{"role": "user", "content": "Name a colour."}]"#),
    ];
    for (id, msgs) in prompts {
        for k in 0..3 {
            s += &format!(
                "{{\"prompt_id\": \"{id}\", \"messages\": {msgs}, \"sample_idx\": {k}, \"response\": \"answer {k}\", \"reward\": {}}}\n",
                k as f64 * 0.5
            );
        }
    }
    s
}

#[test]
fn messages_reach_trl_chat_through_select() {
    let yaml = "name: sel
stages:
  - id: scored
    kind: source
    path: scored.jsonl
  - id: pairs
    kind: select
    input: scored
    strategy: max_min
  - id: all
    kind: export
    input: pairs
    path: out/pairs.parquet
  - id: chat
    kind: export
    input: pairs
    path: out/chat.parquet
    format: trl_chat
";
    let dir = setup(yaml, &[("scored.jsonl", &scored_chat())]);
    run(dir.path());
    let pairs = one(&dir.path().join("out/pairs.parquet"));
    assert!(pairs.schema().field_with_name("messages").is_ok(), "select carries `messages` (a per-prompt column)");
    let chat = one(&dir.path().join("out/chat.parquet"));
    let p = convs(&chat, "prompt");
    assert_eq!(p[0], [m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello!"), m("user", "2+2?")]);
    assert_eq!(p[1], [m("user", "Name a colour.")]);
    // max_min: chosen = the highest reward (sample 2), rejected = the lowest (sample 0).
    assert_eq!(convs(&chat, "chosen")[0], [m("assistant", "answer 2")]);
    assert_eq!(convs(&chat, "rejected")[0], [m("assistant", "answer 0")]);
}

/// Runs a failing pipeline; checks exit 2, one `error:` line, no output, no panic; returns stderr.
fn rejected(dir: &Path) -> String {
    let o = prefpipe(dir, &["run", "pipeline.yaml"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "exit code 2 expected; stderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "one line: {err}");
    assert!(files_under(&dir.join("out")).is_empty(), "no output file: {err}");
    err
}

#[test]
fn trl_strings_refuse_conversations_at_plan_time() {
    let yaml =
        SHARDS_TO_TRL_CHAT.replace("    path: out/pairs.parquet\n    format: trl_chat", "    path: out/pairs.parquet\n    format: trl");
    let dir = setup(&yaml, &[]);
    let e = rejected(dir.path());
    assert!(e.contains("pipeline.yaml:10:13: stage `chat`:") && e.contains("use `format: trl_chat`"), "{e}");
    let v = prefpipe(dir.path(), &["validate", "pipeline.yaml"]);
    assert_eq!(v.status.code(), Some(2), "{}", stderr(&v));
}

#[test]
fn bad_conversations_exit_2_naming_the_row() {
    let good = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let cases = [
        (
            r#"[{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]"#,
            "message 2 has unknown role `tool`",
        ),
        (
            r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]"#,
            "ends with a `assistant` turn",
        ),
        (r#"[{"role": "user", "content": "   "}, {"role": "assistant", "content": "y"}]"#, "message 1 (`user`) has empty content"),
        (r#"[{"role": "system", "content": "S"}, {"role": "assistant", "content": "y"}]"#, "ends with a `system` turn"),
    ];
    for (bad, want) in cases {
        let data = format!("{good}\n{good}\n{{\"messages\": {bad}}}\n");
        let yaml = "stages:
  - id: src
    kind: source
    path: bad.jsonl
    strip_trailing_assistant: true
  - id: out
    kind: export
    input: src
    path: out/x.parquet
";
        let dir = setup(yaml, &[("bad.jsonl", &data)]);
        let e = rejected(dir.path());
        assert!(e.contains("stage `src`:") && e.contains("bad.jsonl: row 3: `messages` ") && e.contains(want), "{want}: {e}");
    }
    // Wrong types are caught by `validate`, at the source's line.
    let yaml = "stages:\n  - id: src\n    kind: source\n    path: bad.jsonl\n";
    let dir = setup(yaml, &[("bad.jsonl", "{\"messages\": [\"just a string\"]}\n")]);
    let e = rejected(dir.path());
    assert!(e.contains("pipeline.yaml:4:11: stage `src`:") && e.contains("must be a list of {role, content} messages"), "{e}");
    let v = prefpipe(dir.path(), &["validate", "pipeline.yaml"]);
    assert_eq!(v.status.code(), Some(2));
}

#[test]
fn trl_trains_one_dpo_step_on_a_trl_chat_export() {
    let python = crate::servers::venv_python();
    let dir = setup(SHARDS_TO_TRL_CHAT, &[]);
    run(dir.path());
    for (file, model) in [("out/pairs.parquet", "tiny-qwen3-chat"), ("out/pairs.jsonl", "tiny-llama31-chat")] {
        let o = std::process::Command::new(&python)
            .arg(root().join("tests/reference/trl_dpo_step.py"))
            .arg(dir.path().join(file))
            .arg(root().join("data-samples/models").join(model))
            .output()
            .unwrap();
        let out = stdout(&o);
        assert!(o.status.success(), "{file} on {model}:\n{out}\n{}", stderr(&o));
        // The reference is TRL's frozen copy of the policy, so step 1 has loss ln 2 = 0.693147.
        assert!(out.contains("10 pairs") && out.contains("step-1 loss 0.693147"), "{out}");
    }
}

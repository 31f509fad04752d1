//! Remote model servers (DESIGN §11, issue 9): a real llama.cpp server
//! (xllamacpp, SmolLM2-135M-Instruct), the scripted OpenAI server for client
//! behaviour (retries, errors, concurrency, kill -9), and the vLLM-shaped
//! server over transformers for `/classify` and prompt log-probs.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use arrow::array::{Array, Float64Array, StringArray, UInt32Array};
use serde_json::Value;

use crate::common::{bin, files_under, ok, prefpipe, read, root, stderr};
use crate::servers::Server;

/// A pipeline dir with `prompts.jsonl` (`n` prompts, numbered) and `pipeline.yaml`.
fn setup(yaml: &str, prompts: &[String]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = prompts.iter().map(|p| format!("{}\n", serde_json::json!({ "prompt": p }))).collect();
    std::fs::write(dir.path().join("prompts.jsonl"), lines).unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), yaml).unwrap();
    dir
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("Say something about the number {i}.")).collect()
}

/// A generate pipeline against `url`, exporting the samples table as Parquet.
fn generate_yaml(url: &str, server: &str, extra_model: &str, extra_stage: &str) -> String {
    format!(
        "name: remote-test
chunk_size: 2
models:
  policy:
    backend: openai
    server: {server}
    base_url: {url}
    model: scripted
    wait_ready_s: 60
{extra_model}stages:
  - id: prompts
    kind: source
    path: prompts.jsonl
  - id: samples
    kind: generate
    input: prompts
    model: policy
    n: 2
    max_new_tokens: 8
    chat_template: true
{extra_stage}  - id: out
    kind: export
    input: samples
    path: samples.parquet
"
    )
}

fn run_json(store: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(store.join("run.json")).unwrap()).unwrap()
}

fn stage<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no stage {id} in {run}"))
}

/// The JSON lines a scripted server logged.
fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn received(log: &[Value]) -> Vec<String> {
    log.iter().filter(|l| l.get("body_sha").is_some()).map(|l| l["body_sha"].as_str().unwrap().to_string()).collect()
}

/// A plain HTTP/1.1 GET (std only), for llama.cpp's /metrics.
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// llama.cpp's counters of prompt and predicted tokens: unchanged = no request processed.
fn llamacpp_tokens(port: u16) -> (f64, f64) {
    let m = http_get(port, "/metrics");
    let get = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in llama.cpp /metrics:\n{m}"))
    };
    (get("llamacpp:prompt_tokens_total"), get("llamacpp:tokens_predicted_total"))
}

fn responses(path: &Path) -> Vec<(String, u32, String)> {
    let mut out = Vec::new();
    for b in read(path) {
        let ids = b.column_by_name("prompt_id").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        let idx = b.column_by_name("sample_idx").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().clone();
        let r = b.column_by_name("response").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        for i in 0..b.num_rows() {
            out.push((ids.value(i).to_string(), idx.value(i), r.value(i).to_string()));
        }
    }
    out
}

#[test]
fn llamacpp_generates_reproducibly_and_replays_from_the_cache() {
    let server = Server::start("llamacpp.py", &["--parallel", "2"]);
    let yaml = generate_yaml(&server.base_url(), "llamacpp", "", "").replace("n: 2", "n: 4\n    temperature: 1.0");
    let dir = setup(&yaml, &numbered(3));
    let store_a = dir.path().join("a");
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml", "--store", store_a.to_str().unwrap()]));
    let first = std::fs::read(dir.path().join("samples.parquet")).unwrap();
    let rows = responses(&dir.path().join("samples.parquet"));
    // 3 prompts × n 4; each sample has its own seed, so a prompt's 4 samples differ.
    assert_eq!(rows.len(), 12);
    for p in rows.iter().map(|r| &r.0).collect::<HashSet<_>>() {
        let texts: HashSet<&str> = rows.iter().filter(|r| &r.0 == p).map(|r| r.2.as_str()).collect();
        assert!(texts.len() >= 3, "samples of {p} should differ (distinct seeds): {texts:?}");
    }
    let run = run_json(&store_a);
    let req = &stage(&run, "samples")["backend"]["requests"];
    assert_eq!(req["sent"], 12, "{run}");
    assert_eq!(stage(&run, "samples")["backend"]["server"], "llamacpp");

    // A fresh store: the same requests (seeds from the pipeline seed), the same text.
    let store_b = dir.path().join("b");
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml", "--store", store_b.to_str().unwrap()]));
    assert_eq!(std::fs::read(dir.path().join("samples.parquet")).unwrap(), first, "same seeds, same samples");

    // The same store: nothing reaches the server, not even when the stage is forced to rerun
    // (the request cache answers every request).
    let before = llamacpp_tokens(server.port);
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml", "--store", store_a.to_str().unwrap()]));
    assert_eq!(stage(&run_json(&store_a), "samples")["status"], "cached");
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml", "--store", store_a.to_str().unwrap(), "--force", "samples"]));
    let run = run_json(&store_a);
    let req = &stage(&run, "samples")["backend"]["requests"];
    assert_eq!((req["sent"].as_u64(), req["from_cache"].as_u64()), (Some(0), Some(12)), "{run}");
    assert_eq!(llamacpp_tokens(server.port), before, "the server processed no request");
    assert_eq!(std::fs::read(dir.path().join("samples.parquet")).unwrap(), first);
}

#[test]
fn llamacpp_context_error_drops_the_prompt() {
    let server = Server::start("llamacpp.py", &["--ctx", "256"]);
    let yaml = generate_yaml(&server.base_url(), "llamacpp", "", "");
    let mut prompts = numbered(2);
    prompts.push("word ".repeat(400)); // > 256 tokens: llama.cpp answers 400 exceed_context_size_error
    let dir = setup(&yaml, &prompts);
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let run = run_json(&dir.path().join(".prefpipe"));
    // One prompt dropped (counted once per prompt), its 2 samples absent.
    assert_eq!(stage(&run, "samples")["drops"]["prompt_too_long"], 1, "{run}");
    assert_eq!(responses(&dir.path().join("samples.parquet")).len(), 4);
}

#[test]
fn scripted_server_concurrency_retries_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let log = dir.path().join("log.jsonl");
    let server = Server::start(
        "scripted.py",
        &[
            "--latency-ms",
            "40",
            "--fail-first",
            "1",
            "--fail-status",
            "429",
            "--retry-after",
            "0.2",
            "--stats",
            stats.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let secret = "sk-prefpipe-test-7f3a9c";
    let extra = "    max_concurrency: 3\n    api_key_env: PREFPIPE_TEST_API_KEY\n";
    let d = setup(&generate_yaml(&server.base_url(), "vllm", extra, ""), &numbered(12));
    let o = Command::new(bin()).args(["run", "pipeline.yaml"]).current_dir(d.path()).env("PREFPIPE_TEST_API_KEY", secret).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // 12 prompts × n 2 = 24 requests, each answered 429 once (Retry-After 0.2 s) then 200.
    let st: Value = serde_json::from_str(std::fs::read_to_string(&stats).unwrap().trim()).unwrap();
    assert_eq!(st["requests"], 48, "{st}");
    assert!(st["max_in_flight"].as_u64().unwrap() <= 3, "max_concurrency 3 respected: {st}");
    assert_eq!(st["max_in_flight"], 3, "chunks of 4 requests overlap to keep 3 in flight: {st}");
    let run = run_json(&d.path().join(".prefpipe"));
    let req = &stage(&run, "samples")["backend"]["requests"];
    assert_eq!((req["sent"].as_u64(), req["retried"].as_u64()), (Some(24), Some(24)), "{run}");
    // Each distinct body was seen exactly twice (the 429, then the answer).
    let got = received(&log_lines(&log));
    assert_eq!(got.len(), 48);
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), 24);
    // The key is in no file of the store and nowhere on stderr.
    assert!(!err.contains(secret));
    for f in files_under(&d.path().join(".prefpipe")) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the API key leaked into {}", f.display());
    }
    // The seeds sent are in 0..2^31 and distinct per sample.
    let seeds: HashSet<u64> = log_lines(&log).iter().filter_map(|l| l.get("body")).map(|b| b["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds.len(), 24);
    assert!(seeds.iter().all(|&s| s < 1 << 31));
}

#[test]
fn scripted_server_errors_fail_or_drop() {
    let server = Server::start("scripted.py", &["--context-error-marker", "TOOLONG", "--malformed-marker", "BROKEN"]);
    // A context-length 400 drops the prompt as prompt_too_long.
    let mut prompts = numbered(3);
    prompts.push("TOOLONG please".into());
    let d = setup(&generate_yaml(&server.base_url(), "vllm", "", ""), &prompts);
    ok(prefpipe(d.path(), &["run", "pipeline.yaml"]));
    let run = run_json(&d.path().join(".prefpipe"));
    assert_eq!(stage(&run, "samples")["drops"]["prompt_too_long"], 1);
    // run.json says what ran: the model behind a server.
    assert_eq!((&run["device"], &stage(&run, "samples")["device"]), (&"remote".into(), &"remote".into()), "{run}");
    assert_eq!(responses(&d.path().join("samples.parquet")).len(), 6);
    // A 200 without `choices` fails the stage (exit 1) with a message that names what is wrong.
    let mut prompts = numbered(3);
    prompts.push("BROKEN please".into());
    let d = setup(&generate_yaml(&server.base_url(), "vllm", "", ""), &prompts);
    let o = prefpipe(d.path(), &["run", "pipeline.yaml"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("samples") && err.contains("choices"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!d.path().join("samples.parquet").exists());
}

#[test]
fn kill_9_mid_run_then_rerun_sends_no_answered_request_again() {
    let dir = tempfile::tempdir().unwrap();
    let log1 = dir.path().join("log1.jsonl");
    // The first server answers 7 requests, then reads but never answers.
    let first = Server::start("scripted.py", &["--stall-after", "7", "--log", log1.to_str().unwrap()]);
    let d = setup(&generate_yaml(&first.base_url(), "vllm", "    max_concurrency: 2\n", ""), &numbered(10));
    let mut child = Command::new(bin())
        .args(["run", "pipeline.yaml"])
        .current_dir(d.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded, so a hang cannot hang the suite) until 7 answers went out and the next requests wait.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = log_lines(&log1);
        let done = lines.iter().filter(|l| l.get("done").is_some()).count();
        if done >= 7 && received(&lines).len() >= 9 {
            break;
        }
        assert!(Instant::now() < deadline, "the first run never reached 7 answers");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300)); // let the client write what it got
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(first);
    let answered: HashSet<String> =
        log_lines(&log1).iter().filter_map(|l| l.get("done").and_then(Value::as_str).map(str::to_string)).collect();
    assert_eq!(answered.len(), 7);

    // A new server (another port) for the rerun.
    let log2 = dir.path().join("log2.jsonl");
    let second = Server::start("scripted.py", &["--log", log2.to_str().unwrap()]);
    let yaml = std::fs::read_to_string(d.path().join("pipeline.yaml"))
        .unwrap()
        .replace(&format!("127.0.0.1:{}", first_port(&d)), &format!("127.0.0.1:{}", second.port));
    std::fs::write(d.path().join("pipeline.yaml"), yaml).unwrap();
    ok(prefpipe(d.path(), &["run", "pipeline.yaml"]));
    let resent = received(&log_lines(&log2));
    // 10 prompts × n 2 = 20 requests: the 7 answered come from the request cache.
    assert_eq!(resent.len(), 13, "rerun sends only what was not answered");
    assert!(resent.iter().all(|s| !answered.contains(s)), "an answered request was sent again");
    let run = run_json(&d.path().join(".prefpipe"));
    // Chunks finished before the kill are not re-run at all; the rest of the 7 answers replay.
    let req = &stage(&run, "samples")["backend"]["requests"];
    assert_eq!(req["sent"], 13, "{run}");
    assert!(req["from_cache"].as_u64().unwrap() <= 7, "{run}");
    assert_eq!(responses(&d.path().join("samples.parquet")).len(), 20);
}

/// The port the pipeline file names (the first server's).
fn first_port(d: &tempfile::TempDir) -> u16 {
    let yaml = std::fs::read_to_string(d.path().join("pipeline.yaml")).unwrap();
    let at = yaml.find("127.0.0.1:").unwrap() + "127.0.0.1:".len();
    yaml[at..].split('/').next().unwrap().parse().unwrap()
}

fn column(path: &Path, name: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for b in read(path) {
        let c = b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
        let c = c.as_any().downcast_ref::<Float64Array>().unwrap();
        out.extend((0..c.len()).map(|i| c.value(i)));
    }
    out
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(b) {
        // Issue 9 acceptance 2: remote equals local within 1e-4 relative.
        assert!((x - y).abs() <= 1e-4 * x.abs().max(y.abs()).max(1e-6), "{what}: local {x} vs remote {y}");
    }
}

#[test]
fn vllm_classify_and_prompt_logprobs_equal_local() {
    let models = root().join("data-samples/models");
    let rm = models.join("tiny-llama-rm");
    let lm = models.join("tiny-llama");
    let server =
        Server::start("vllm_like.py", &["--reward", rm.to_str().unwrap(), "--policy", lm.to_str().unwrap(), "--served-name", "tiny"]);
    let yaml = format!(
        "name: vllm-shapes
chunk_size: 3
models:
  rm_local: {rm}
  lm_local: {lm}
  rm_remote: {{backend: openai, server: vllm, base_url: {url}, model: tiny, tokenizer: {rm}}}
  lm_remote: {{backend: openai, server: vllm, base_url: {url}, model: tiny, tokenizer: {lm}}}
stages:
  - {{id: raw, kind: source, path: {scored}, limit: 6}}
  - {{id: rows, kind: sql, input: raw, query: 'SELECT prompt_id, prompt, sample_idx, response FROM raw'}}
  - id: scored
    kind: score
    input: rows
    reward_models:
      - {{name: local, model: rm_local}}
      - {{name: remote, model: rm_remote}}
  - {{id: lp_local, kind: logprob, input: rows, model: lm_local}}
  - {{id: lp_remote, kind: logprob, input: rows, model: lm_remote}}
  - {{id: e1, kind: export, input: scored, path: scored.parquet}}
  - {{id: e2, kind: export, input: lp_local, path: lp_local.parquet}}
  - {{id: e3, kind: export, input: lp_remote, path: lp_remote.parquet}}
",
        rm = rm.display(),
        lm = lm.display(),
        url = server.base_url(),
        scored = root().join("data-samples/scored.jsonl").display()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), yaml).unwrap();
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
    assert!(o.status.success(), "{}\n--- server:\n{}", stderr(&o), server.stderr_text());
    let s = dir.path().join("scored.parquet");
    close(&column(&s, "reward_local"), &column(&s, "reward_remote"), "reward");
    let lp = column(&dir.path().join("lp_local.parquet"), "logp_policy");
    close(&lp, &column(&dir.path().join("lp_remote.parquet"), "logp_policy"), "logp_policy");
    // The raw head output, not sigmoid(reward): some rewards lie outside (0, 1).
    assert!(column(&s, "reward_remote").iter().any(|r| !(0.0..=1.0).contains(r)), "use_activation: false");
}

#[test]
fn the_remote_example_pipeline_runs_against_servers() {
    let policy = Server::start("llamacpp.py", &["--parallel", "2", "--alias", "policy"]);
    let rm = root().join("data-samples/models/tiny-llama-rm");
    let reward = Server::start("vllm_like.py", &["--reward", rm.to_str().unwrap(), "--served-name", "reward"]);
    let store = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(root().join("pipelines/remote.yaml")).unwrap();
    // The same file, exported into a temp dir instead of the repository's out/.
    let yaml = yaml
        .replace("../data-samples/", &format!("{}/data-samples/", root().display()))
        .replace("path: ../out/remote-pairs.parquet", &format!("path: {}/remote-pairs.parquet", out_dir.path().display()));
    std::fs::write(out_dir.path().join("remote.yaml"), yaml).unwrap();
    let o = Command::new(bin())
        .args(["run", "remote.yaml", "--store", store.path().to_str().unwrap()])
        .current_dir(out_dir.path())
        .env("POLICY_URL", policy.base_url())
        .env("RM_URL", reward.base_url())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let pairs = read(&out_dir.path().join("remote-pairs.parquet"));
    assert!(pairs.iter().map(|b| b.num_rows()).sum::<usize>() >= 1);
}

/// A remote-model error at plan time: exit 2, one located line, and no
/// connection to the server it names.
fn refused(models: &str, stages: &str, want: &str, line: u32) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://127.0.0.1:{}/v1", listener.local_addr().unwrap().port());
    let yaml = format!(
        "name: bad\nmodels:\n{}\nstages:\n  - id: prompts\n    kind: source\n    path: prompts.jsonl\n{}",
        models.replace("URL", &url),
        stages
    );
    let d = setup(&yaml, &[]);
    // Rows every stage kind here can read: prompts with a response and a pair.
    let row = if stages.contains("kind: generate") {
        serde_json::json!({"prompt": "Hi?"})
    } else {
        serde_json::json!({"prompt_id": "p0", "prompt": "Hi?", "response": "Hello.", "chosen": "Hello.", "rejected": "Go away."})
    };
    std::fs::write(d.path().join("prompts.jsonl"), format!("{row}\n")).unwrap();
    let o = Command::new(bin()).args(["run", "pipeline.yaml"]).current_dir(d.path()).env_remove("PREFPIPE_UNSET_KEY").output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(want), "expected {want:?} in {err}");
    assert!(err.contains(&format!("pipeline.yaml:{line}:")), "expected line {line}: {err}");
    assert!(listener.accept().is_err(), "no request before the plan is valid");
}

const GEN: &str = "  - id: samples\n    kind: generate\n    input: prompts\n    model: policy\n";

#[test]
fn bad_remote_models_are_refused_at_plan_time() {
    // Line numbers: 1 name, 2 models:, 3 the entry's name, 4.. its keys (the entry's mapping starts at 4).
    refused("  policy:\n    backend: openai\n    base_url: URL\n", GEN, "needs `model:`", 4);
    refused("  policy:\n    backend: openai\n    base_url: localhost:8000\n    model: m\n", GEN, "not an http:// or https:// URL", 5);
    refused(
        "  policy:\n    backend: openai\n    base_url: URL\n    model: m\n    api_key_env: PREFPIPE_UNSET_KEY\n",
        GEN,
        "`PREFPIPE_UNSET_KEY` (the API key) is not set",
        7,
    );
    refused(
        "  policy:\n    backend: openai\n    base_url: URL\n    model: m\n    max_concurency: 4\n",
        GEN,
        "unknown field `max_concurency`",
        7,
    );
    let lp = "  - id: samples\n    kind: logprob\n    input: prompts\n    model: policy\n";
    let llama = "  policy:\n    backend: openai\n    server: llamacpp\n    base_url: URL\n    model: m\n";
    // The stage's `model:` line: 8 blank, 9 stages:, 10-12 the source, 13 the stage's id, 14 kind, 15 input, 16 model.
    refused(llama, lp, "ignores `echo`", 16);
    let score = "  - id: samples\n    kind: score\n    input: prompts\n    reward_models:\n      - {name: rm, model: policy}\n";
    refused(llama, score, "/classify", 17);
    let train = "  - id: samples\n    kind: train\n    input: prompts\n    method: dpo\n    model: policy\n    output: ckpt\n";
    refused(llama, train, "need the model in-process", 17);
}

//! Sharded runs on one store (DESIGN §13, issue 12), on a local directory
//! and on a real S3-compatible server on loopback: `moto_server` from the
//! repository's `.venv` (scripts/setup-venv.sh installs `moto[server]`),
//! started on 127.0.0.1 port 0 and killed by PID when the test ends.
//!
//! The pipeline has a barrier in the middle: prompts → generate (a scripted
//! OpenAI server, so the request cache is exercised) → sql (whole input) →
//! score (per chunk again, on the sql output cut back into chunks) → select →
//! export. Every sharded schedule must export the bytes an unsharded local
//! run exports.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::Value;

use crate::common::{bin, files_under, stderr};
use crate::servers::{venv_python, Server};

/// Credentials moto accepts; the secret must never show up anywhere.
const KEY_ID: &str = "prefpipe-test-key";
const SECRET: &str = "s3cr3t-never-logged-9f1c";

const PIPELINE: &str = "name: shard-e2e
chunk_size: 3
models:
  policy:
    backend: openai
    server: vllm
    base_url_env: POLICY_URL
    model: scripted
    wait_ready_s: 60
stages:
  - id: prompts
    kind: source
    path: prompts.jsonl
  - id: samples
    kind: generate
    input: prompts
    model: policy
    n: 4
    max_new_tokens: 8
    chat_template: true
  - id: kept
    kind: sql
    input: samples
    query: \"SELECT * FROM samples WHERE sample_idx < 3 ORDER BY prompt_id, sample_idx\"
  - id: scored
    kind: score
    input: kept
    rules:
      - name: length
        kind: length
        target: 3
        per_token: 0.25
        unit: words
  - id: pairs
    kind: select
    input: scored
    strategy: reward_points
  - id: export
    kind: export
    input: pairs
    path: pairs.parquet
    format: trl
";

/// 24 prompts, 3 per chunk: 8 chunks; shard 0/3 owns 0, 3, 6.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let lines: String =
        (0..24).map(|i| format!("{}\n", serde_json::json!({ "prompt": format!("Say something about the number {i}.") }))).collect();
    std::fs::write(dir.path().join("prompts.jsonl"), lines).unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), PIPELINE).unwrap();
    dir
}

/// A running `moto_server`; killed (by PID) and reaped on drop.
struct Moto {
    port: u16,
    child: Child,
}

impl Moto {
    fn start() -> Moto {
        let python = venv_python();
        let exe = python.parent().unwrap().join("moto_server");
        assert!(exe.exists(), "{} is missing: run scripts/setup-venv.sh (it installs moto[server])", exe.display());
        let mut child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        // moto logs every request to stderr: a thread drains it for as long as it runs.
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(port) = line.split("http://127.0.0.1:").nth(1).and_then(|p| p.trim().parse::<u16>().ok()) {
                        sent = true;
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let port =
            rx.recv_timeout(Duration::from_secs(60)).expect("moto_server printed no `Running on http://127.0.0.1:PORT` line within 60 s");
        let moto = Moto { port, child };
        moto.create_bucket("bkt");
        moto
    }

    /// CreateBucket as a plain unsigned HTTP PUT (moto accepts it).
    fn create_bucket(&self, name: &str) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "CreateBucket {name}: {out}");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a run on this server gets (object_store's standard variables).
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("bkt")
            .with_region("us-east-1")
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(KEY_ID)
            .with_secret_access_key(SECRET)
            .build()
            .unwrap()
    }

    /// Every key under `prefix/` in the bucket, sorted, relative to the prefix.
    fn list(&self, prefix: &str) -> Vec<String> {
        let c = self.client();
        let p = object_store::path::Path::from(prefix);
        let metas: Vec<_> = block_on(async { c.list(Some(&p)).try_collect::<Vec<_>>().await }).unwrap();
        let mut keys: Vec<String> =
            metas.into_iter().map(|m| m.location.as_ref().strip_prefix(&format!("{prefix}/")).unwrap().to_string()).collect();
        keys.sort();
        keys
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let c = self.client();
        let p = object_store::path::Path::from(key);
        match block_on(async { c.get(&p).await?.bytes().await }) {
            Ok(b) => Some(b.to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("GET {key}: {e}"),
        }
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        let c = self.client();
        let p = object_store::path::Path::from(key);
        block_on(async { c.put(&p, PutPayload::from(bytes)).await }).unwrap();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL to this PID only
        let _ = self.child.wait();
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Where a test's store is.
enum Kind {
    Local,
    S3,
}

/// One test's store and the environment its runs get.
struct Env {
    moto: Option<Moto>,
    store: String,
    prefix: String,
    /// PREFPIPE_STAGING_DIR: object-store mirrors go here (empty after clean runs).
    staging: tempfile::TempDir,
    policy_url: String,
    extra: Vec<(String, String)>,
}

impl Env {
    fn new(kind: Kind, dir: &Path, prefix: &str, server: &Server) -> Env {
        let (moto, store) = match kind {
            Kind::Local => (None, dir.join("store").display().to_string()),
            Kind::S3 => (Some(Moto::start()), format!("s3://bkt/{prefix}")),
        };
        Env {
            moto,
            store,
            prefix: prefix.to_string(),
            staging: tempfile::tempdir().unwrap(),
            policy_url: server.base_url(),
            extra: Vec::new(),
        }
    }

    fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args).arg("--store").arg(&self.store).current_dir(dir);
        self.environment(&mut c);
        c
    }

    /// What every command of the test gets: the store's credentials and no others.
    fn environment(&self, c: &mut Command) {
        for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"] {
            c.env_remove(k);
        }
        if let Some(m) = &self.moto {
            c.envs(m.env());
        }
        c.env("POLICY_URL", &self.policy_url).env("PREFPIPE_STAGING_DIR", self.staging.path()).envs(self.extra.iter().cloned());
    }

    fn run(&self, dir: &Path, args: &[&str]) -> Output {
        self.command(dir, args).output().unwrap()
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let o = self.run(dir, args);
        let err = stderr(&o);
        assert!(o.status.success(), "prefpipe {args:?} failed ({:?}):\n{err}", o.status.code());
        assert!(!err.contains(SECRET), "the secret leaked into stderr:\n{err}");
        err
    }

    fn spawn(&self, dir: &Path, args: &[&str]) -> Child {
        self.command(dir, args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// A file of the store (`run.json`, …), wherever the store is.
    fn read(&self, dir: &Path, rel: &str) -> Option<Vec<u8>> {
        match &self.moto {
            Some(m) => m.get(&format!("{}/{rel}", self.prefix)),
            None => std::fs::read(dir.join("store").join(rel)).ok(),
        }
    }

    fn run_json(&self, dir: &Path, name: &str) -> Value {
        serde_json::from_slice(&self.read(dir, name).unwrap_or_else(|| panic!("no {name} in the store"))).unwrap()
    }

    /// Every file of the store, relative to its root.
    fn objects(&self, dir: &Path) -> Vec<String> {
        match &self.moto {
            Some(m) => m.list(&self.prefix),
            None => {
                let root = dir.join("store");
                files_under(&root).iter().map(|p| p.strip_prefix(&root).unwrap().to_string_lossy().into_owned()).collect()
            }
        }
    }
}

fn wait_ok(mut c: Child, what: &str) {
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = c.wait().unwrap();
    assert!(status.success(), "{what} failed ({status}):\n{err}");
    assert!(!err.contains(SECRET), "the secret leaked into stderr:\n{err}");
}

fn status_of(run: &Value, id: &str) -> String {
    run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no stage {id} in {run}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The export of an unsharded run on a local store.
fn reference(server: &Server) -> Vec<u8> {
    let d = setup();
    let env = Env::new(Kind::Local, d.path(), "", server);
    env.ok(d.path(), &["run", "pipeline.yaml"]);
    std::fs::read(d.path().join("pairs.parquet")).unwrap()
}

/// 3 shards (two at once) → final run up to the barrier → 3 shards again
/// (the per-chunk stage after the barrier) → final run: the unsharded bytes.
fn shards_then_final(kind: Kind) {
    let server = Server::start("scripted.py", &[]);
    let expected = reference(&server);
    let d = setup();
    let dir = d.path();
    let env = Env::new(kind, dir, "runs/e2e", &server);
    let shard = |i: usize| ["run", "pipeline.yaml", "--shard", ["0/3", "1/3", "2/3"][i]];

    // Round 1: shards 0 and 1 at once, then 2.
    let (a, b) = (env.spawn(dir, &shard(0)), env.spawn(dir, &shard(1)));
    wait_ok(a, "shard 0/3");
    wait_ok(b, "shard 1/3");
    let err = env.ok(dir, &shard(2));
    assert!(err.contains("shard 2/3: done; a run without --shard finishes kept, scored, pairs, export"), "{err}");
    assert!(!dir.join("pairs.parquet").exists(), "a shard never runs a whole-input stage");
    let r = env.run_json(dir, "run-shard-2-of-3.json");
    assert_eq!(status_of(&r, "kept"), "deferred");
    assert_eq!(status_of(&r, "export"), "deferred");
    // The last shard to finish completes the per-chunk stage (the others' chunks are there).
    assert_eq!(status_of(&r, "samples"), "resumed", "{r}");
    let r0 = env.run_json(dir, "run-shard-0-of-3.json");
    assert!(["partial", "ran"].contains(&status_of(&r0, "samples").as_str()), "{r0}");

    // The barrier, and only it: its output is cut into chunks of 3 prompts again.
    env.ok(dir, &["run", "pipeline.yaml", "--until", "kept"]);
    let r = env.run_json(dir, "run.json");
    assert_eq!(status_of(&r, "kept"), "ran");
    let kept = r["stages"].as_array().unwrap().iter().find(|s| s["id"] == "kept").unwrap();
    assert_eq!(kept["chunks"], 8, "24 prompts in chunks of 3: {kept}");

    // Round 2: the per-chunk stage after the barrier runs sharded.
    let (a, b) = (env.spawn(dir, &shard(1)), env.spawn(dir, &shard(2)));
    wait_ok(a, "shard 1/3");
    wait_ok(b, "shard 2/3");
    env.ok(dir, &shard(0));
    for i in 0..3 {
        let r = env.run_json(dir, &format!("run-shard-{i}-of-3.json"));
        assert_eq!(status_of(&r, "kept"), "cached");
        assert_ne!(status_of(&r, "scored"), "deferred", "{r}");
        assert_eq!(status_of(&r, "pairs"), "deferred");
    }

    // The final run: every chunk is done; the whole-input stages run once.
    env.ok(dir, &["run", "pipeline.yaml"]);
    let r = env.run_json(dir, "run.json");
    assert_eq!(status_of(&r, "scored"), "cached", "the shards finished `scored`: {r}");
    assert_eq!(status_of(&r, "pairs"), "ran");
    assert_eq!(std::fs::read(dir.join("pairs.parquet")).unwrap(), expected, "sharded export = unsharded export, byte for byte");

    // plan and query read the same store.
    let o = env.run(dir, &["plan", "pipeline.yaml"]);
    let plan = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(plan.lines().filter(|l| l.ends_with("done")).count(), 6, "{plan}\n{}", stderr(&o));
    let o = env.run(dir, &["query", "SELECT count(*) AS n FROM scored", "--pipeline", "pipeline.yaml", "--format", "csv"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "n\n72\n", "{}", stderr(&o));

    // The store's files: the layout of a local store, no lease, lock holder or temp file left.
    let objects = env.objects(dir);
    let has = |pred: &dyn Fn(&str) -> bool| objects.iter().any(|o| pred(o));
    for want in ["run.json", "run-shard-0-of-3.json", "run-shard-1-of-3.json", "run-shard-2-of-3.json"] {
        assert!(objects.iter().any(|o| o == want), "no {want} in {objects:#?}");
    }
    for (stage, chunks) in [("prompts", 8), ("samples", 8), ("kept", 8), ("scored", 8), ("pairs", 8)] {
        let n = objects.iter().filter(|o| o.starts_with(&format!("stages/{stage}-")) && o.ends_with(".parquet")).count();
        assert_eq!(n, chunks, "{stage}: {objects:#?}");
        assert!(has(&|o: &str| o.starts_with(&format!("stages/{stage}-")) && o.ends_with("/manifest.json")), "{stage}");
    }
    assert!(
        has(&|o: &str| o.starts_with("requests/samples/") && o.ends_with(".parquet")),
        "the request cache is in the store: {objects:#?}"
    );
    assert!(!has(&|o: &str| o.contains(".tmp-")), "no temp file: {objects:#?}");
    assert!(!has(&|o: &str| o.starts_with("leases/")), "leases are deleted on a clean exit: {objects:#?}");
    assert!(!has(&|o: &str| o.ends_with(".log")), "request logs are folded: {objects:#?}");
    assert!(!has(&|o: &str| o.contains("/chunk-") && o.ends_with(".json")), "chunk records fold into complete manifests: {objects:#?}");
    if env.moto.is_some() {
        assert!(files_under(env.staging.path()).is_empty(), "clean runs delete their mirror: {:?}", files_under(env.staging.path()));
        for o in &objects {
            let bytes = env.read(dir, o).unwrap();
            assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "the secret leaked into {o}");
        }
    } else {
        assert!(objects.iter().any(|o| o == "locks/shard-0-of-3"), "{objects:#?}");
    }
}

#[test]
fn local_three_shards_then_final_equal_an_unsharded_run() {
    shards_then_final(Kind::Local);
}

#[test]
fn s3_three_shards_then_final_equal_an_unsharded_run() {
    shards_then_final(Kind::S3);
}

/// The JSON lines a scripted server logged (a line being written is skipped).
fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// `kill -9` of a shard mid-chunk, rerun (another server: answered requests
/// come from the request cache), the other shards, the final run: the same bytes.
fn kill_9_then_rerun(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let log1 = tmp.path().join("log1.jsonl");
    let log2 = tmp.path().join("log2.jsonl");
    // The first server answers 5 requests, then reads but never answers.
    let first = Server::start("scripted.py", &["--stall-after", "5", "--log", log1.to_str().unwrap()]);
    let d = setup();
    let dir = d.path();
    let mut env = Env::new(kind, dir, "runs/kill", &first);
    let mut child =
        env.command(dir, &["run", "pipeline.yaml", "--shard", "0/3"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120); // a hang must not hang the suite
    loop {
        let lines = log_lines(&log1);
        if lines.iter().filter(|l| l.get("done").is_some()).count() >= 5
            && lines.iter().filter(|l| l.get("body_sha").is_some()).count() >= 7
        {
            break;
        }
        assert!(Instant::now() < deadline, "the shard never reached 5 answers");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Longer than the request log's upload interval (1 s), so the object store holds the answers too.
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(first);
    let answered: HashSet<String> =
        log_lines(&log1).iter().filter_map(|l| l.get("done").and_then(Value::as_str).map(str::to_string)).collect();
    assert_eq!(answered.len(), 5);

    let second = Server::start("scripted.py", &["--log", log2.to_str().unwrap()]);
    env.policy_url = second.base_url();
    // The killed shard's lease is still there: its holder is gone from this host, so it is taken over at once.
    env.ok(dir, &["run", "pipeline.yaml", "--shard", "0/3"]);
    let resent: Vec<String> =
        log_lines(&log2).iter().filter_map(|l| l.get("body_sha").and_then(Value::as_str).map(str::to_string)).collect();
    assert!(resent.iter().all(|s| !answered.contains(s)), "an answered request was sent again");
    env.ok(dir, &["run", "pipeline.yaml", "--shard", "1/3"]);
    env.ok(dir, &["run", "pipeline.yaml", "--shard", "2/3"]);
    env.ok(dir, &["run", "pipeline.yaml"]);
    assert_eq!(std::fs::read(dir.join("pairs.parquet")).unwrap(), reference(&second), "identical bytes after kill -9 + rerun");
}

#[test]
fn local_kill_9_of_a_shard_then_rerun_is_identical() {
    kill_9_then_rerun(Kind::Local);
}

#[test]
fn s3_kill_9_of_a_shard_then_rerun_is_identical() {
    kill_9_then_rerun(Kind::S3);
}

/// Shard 0 holds the store (its server never answers); the same shard again,
/// and a run without --shard, exit 1 naming the holder; another shard runs.
fn same_shard_twice(kind: Kind) {
    let stall = Server::start("scripted.py", &["--stall-after", "0"]);
    let d = setup();
    let dir = d.path();
    let mut env = Env::new(kind, dir, "runs/lock", &stall);
    env.extra.push(("PREFPIPE_LEASE_TTL_S".into(), "1".into()));
    let mut first = env.spawn(dir, &["run", "pipeline.yaml", "--shard", "0/3"]);
    let lease = "leases/shard-0-of-3.json";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = match &env.moto {
            Some(m) => m.get(&format!("runs/lock/{lease}")).is_some(),
            None => std::fs::read_to_string(dir.join("store/locks/shard-0-of-3")).is_ok_and(|s| s.contains("pid")),
        };
        if held {
            break;
        }
        assert!(Instant::now() < deadline, "shard 0/3 never took its lock");
        assert!(first.try_wait().unwrap().is_none(), "shard 0/3 exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let holder = format!("is locked by another prefpipe run: shard 0/3, pid {}", first.id());
    let o = env.run(dir, &["run", "pipeline.yaml", "--shard", "0/3"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&holder), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let o = env.run(dir, &["run", "pipeline.yaml"]);
    assert_eq!(o.status.code(), Some(1), "the final run waits for live shards: {}", stderr(&o));
    assert!(stderr(&o).contains(&holder), "{}", stderr(&o));
    if let Some(m) = &env.moto {
        // The lease is renewed while the shard lives (TTL 1 s, renewed every 0.25 s).
        let expiry = || -> f64 {
            serde_json::from_slice::<Value>(&m.get(&format!("runs/lock/{lease}")).unwrap()).unwrap()["expires_unix_s"].as_f64().unwrap()
        };
        let e1 = expiry();
        std::thread::sleep(Duration::from_millis(1500));
        let e2 = expiry();
        assert!(e2 > e1 + 0.5, "the lease was not renewed: {e1} → {e2}");
        assert!(first.try_wait().unwrap().is_none());
    }
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn local_the_same_shard_twice_is_refused() {
    same_shard_twice(Kind::Local);
}

#[test]
fn s3_the_same_shard_twice_is_refused() {
    same_shard_twice(Kind::S3);
}

/// A lease written by a run on another host: refused while it is valid,
/// taken over once it has expired.
#[test]
fn s3_a_stale_lease_is_taken_over() {
    let server = Server::start("scripted.py", &[]);
    let d = setup();
    let dir = d.path();
    let env = Env::new(Kind::S3, dir, "runs/stale", &server);
    let m = env.moto.as_ref().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let lease = |holder: &str, ttl: f64| {
        serde_json::to_vec(&serde_json::json!({
            "holder": holder, "pid": 4242, "host": "elsewhere", "nonce": "0123456789abcdef",
            "acquired_unix_s": now, "expires_unix_s": now + ttl, "ttl_s": ttl,
        }))
        .unwrap()
    };
    m.put("runs/stale/leases/shard-1-of-3.json", lease("shard 1/3", 3.0));
    let o = env.run(dir, &["run", "pipeline.yaml", "--shard", "1/3"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is locked by another prefpipe run: shard 1/3, pid 4242 on elsewhere"), "{}", stderr(&o));
    let o = env.run(dir, &["run", "pipeline.yaml"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("shard 1/3, pid 4242 on elsewhere"), "{}", stderr(&o));
    // Another shard is not in the way.
    env.ok(dir, &["run", "pipeline.yaml", "--shard", "0/3"]);
    // Once expired, the lease is taken over (and deleted when that run exits cleanly).
    let wait = now + 3.2 - SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    std::thread::sleep(Duration::from_secs_f64(wait.max(0.0)));
    env.ok(dir, &["run", "pipeline.yaml", "--shard", "1/3"]);
    assert!(m.get("runs/stale/leases/shard-1-of-3.json").is_none());
    // A whole-store lease held elsewhere keeps shards out.
    m.put("runs/stale/leases/all.json", lease("a run of the whole store", 600.0));
    let o = env.run(dir, &["run", "pipeline.yaml", "--shard", "2/3"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("a run of the whole store, pid 4242 on elsewhere"), "{}", stderr(&o));
}

/// Bad input: one line on stderr, exit 2, nothing run.
#[test]
fn bad_shards_urls_buckets_and_credentials_exit_2() {
    let server = Server::start("scripted.py", &[]);
    let d = setup();
    let dir = d.path();
    let moto = Moto::start();
    let mut env = Env::new(Kind::Local, dir, "", &server);
    let check = |env: &Env, args: &[&str], want: &str| {
        let o = env.run(dir, args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: want {want:?} in {err}");
        assert!(!err.contains(SECRET) && !err.contains("panicked"), "{err}");
    };
    check(&env, &["run", "pipeline.yaml", "--shard", "3/3"], "--shard 3/3: I must be below N");
    check(&env, &["run", "pipeline.yaml", "--shard", "0/0"], "--shard 0/0: N must be at least 1");
    check(&env, &["run", "pipeline.yaml", "--shard", "0/2", "--force", "kept"], "--force kept with --shard 0/2");
    env.store = "ftp://host/x".into();
    check(&env, &["run", "pipeline.yaml"], "unknown URL scheme `ftp://`");
    check(&env, &["plan", "pipeline.yaml"], "unknown URL scheme `ftp://`");
    // No credentials in the environment (the harness removes the AWS variables).
    env.store = "s3://bkt/x".into();
    check(&env, &["run", "pipeline.yaml"], "--store s3://bkt/x: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
    check(&env, &["query", "SELECT 1", "--pipeline", "pipeline.yaml"], "no credentials");
    env.moto = Some(moto);
    env.store = "s3://no-such-bucket/x".into();
    check(&env, &["run", "pipeline.yaml", "--shard", "0/2"], "--store s3://no-such-bucket/x: the bucket `no-such-bucket` does not exist");
    check(&env, &["plan", "pipeline.yaml"], "the bucket `no-such-bucket` does not exist");
    assert!(!dir.join("store").exists() && !PathBuf::from(dir).join(".prefpipe").exists(), "nothing was written");
}

/// A directory for PATH with `prefpipe` (the binary under test) and a stub
/// `sbatch` that runs each job at once: array tasks concurrently, each with
/// its SLURM_ARRAY_TASK_ID; it logs every job's `--dependency` and fails
/// like sbatch when a task fails.
fn fake_cluster_bin(dir: &Path) -> PathBuf {
    let b = dir.join("bin");
    std::fs::create_dir_all(&b).unwrap();
    std::os::unix::fs::symlink(bin(), b.join("prefpipe")).unwrap();
    let sbatch = r#"#!/usr/bin/env bash
set -u
array=""; dep=""; wrap=""
while [ $# -gt 0 ]; do
  case "$1" in
    --array=*) array=${1#--array=} ;;
    --dependency=*) dep=${1#--dependency=} ;;
    --wrap) wrap=$2; shift ;;
  esac
  shift
done
n=$(( $(cat "$SBATCH_DIR/counter" 2>/dev/null || echo 100) + 1 )); echo "$n" > "$SBATCH_DIR/counter"
echo "job $n dependency=$dep array=$array" >> "$SBATCH_DIR/jobs"
if [ -n "$array" ]; then
  pids=()
  for i in $(seq "${array%-*}" "${array#*-}"); do
    SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" >> "$SBATCH_DIR/out" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { echo "sbatch stub: a task failed" >&2; exit 1; }; done
else
  bash -c "$wrap" >> "$SBATCH_DIR/out" 2>&1 || { echo "sbatch stub: the job failed" >&2; exit 1; }
fi
echo "$n;cluster"
"#;
    std::fs::write(b.join("sbatch"), sbatch).unwrap();
    std::fs::set_permissions(b.join("sbatch"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    b
}

fn path_with(b: &Path) -> String {
    format!("{}:{}", b.display(), std::env::var("PATH").unwrap_or_default())
}

/// deploy/slurm-array.sh submits N shards then the final step
/// (`--dependency=afterok`), the store on S3: the unsharded bytes.
#[test]
fn slurm_array_script_runs_shards_then_the_final_step_on_s3() {
    let server = Server::start("scripted.py", &[]);
    let expected = reference(&server);
    let d = setup();
    let dir = d.path();
    let env = Env::new(Kind::S3, dir, "runs/slurm", &server);
    let b = fake_cluster_bin(dir);
    let mut c = Command::new("bash");
    c.arg(crate::common::root().join("deploy/slurm-array.sh")).args(["pipeline.yaml", "3"]).current_dir(dir);
    env.environment(&mut c);
    let o = c.env("STORE", &env.store).env("PATH", path_with(&b)).env("SBATCH_DIR", dir).output().unwrap();
    let out = std::fs::read_to_string(dir.join("out")).unwrap_or_default();
    assert!(o.status.success(), "{}\n{}\njob output:\n{out}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("shards: job 101 (array 0-2); final step: job 102"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let jobs = std::fs::read_to_string(dir.join("jobs")).unwrap();
    assert_eq!(jobs, "job 101 dependency= array=0-2\njob 102 dependency=afterok:101 array=\n");
    assert!(!out.contains(SECRET), "the secret leaked into a job's log");
    assert_eq!(std::fs::read(dir.join("pairs.parquet")).unwrap(), expected);
    for i in 0..3 {
        assert_eq!(status_of(&env.run_json(dir, &format!("run-shard-{i}-of-3.json")), "pairs"), "deferred");
    }
    assert_eq!(status_of(&env.run_json(dir, "run.json"), "pairs"), "ran");
}

/// deploy/k8s-indexed-job.yaml: each shard pod's command (with the index the
/// Job controller sets), then the final pod's, exactly as the manifest says.
#[test]
fn k8s_indexed_job_commands_run_shards_then_the_final_step_on_s3() {
    let server = Server::start("scripted.py", &[]);
    let expected = reference(&server);
    let d = setup();
    let dir = d.path();
    let env = Env::new(Kind::S3, dir, "runs/k8s", &server);
    let b = fake_cluster_bin(dir);
    // The manifest, read with PyYAML from the test venv: (completions, SHARDS, shard args, final args, init command).
    let script = "import json, sys, yaml\n\
        docs = {d['metadata']['name']: d for d in yaml.safe_load_all(open(sys.argv[1]))}\n\
        s, f = docs['prefpipe-shards']['spec'], docs['prefpipe-final']['spec']\n\
        c = s['template']['spec']['containers'][0]\n\
        env = {e['name']: e['value'] for e in c['env']}\n\
        print(json.dumps([s['completions'], s['completionMode'], env['SHARDS'], c['args'][0], f['template']['spec']['containers'][0]['args'][0], f['template']['spec']['initContainers'][0]['command']]))";
    let o =
        Command::new(venv_python()).args(["-c", script]).arg(crate::common::root().join("deploy/k8s-indexed-job.yaml")).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = m[0].as_u64().unwrap();
    assert_eq!(m[1], "Indexed");
    assert_eq!(m[2].as_str().unwrap(), n.to_string(), "SHARDS = completions");
    assert!(m[5].to_string().contains("condition=complete") && m[5].to_string().contains("job/prefpipe-shards"), "{}", m[5]);
    let pipeline = dir.join("pipeline.yaml").display().to_string();
    let pod = |args: &str, index: Option<u64>| {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", &args.replace("/work/pipeline.yaml", &pipeline)]).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::piped());
        env.environment(&mut c);
        c.env("PATH", path_with(&b)).env("STORE", &env.store).env("SHARDS", n.to_string());
        if let Some(i) = index {
            c.env("JOB_COMPLETION_INDEX", i.to_string());
        }
        c.spawn().unwrap()
    };
    let shards: Vec<Child> = (0..n).map(|i| pod(m[3].as_str().unwrap(), Some(i))).collect();
    for (i, c) in shards.into_iter().enumerate() {
        wait_ok(c, &format!("shard pod {i}"));
    }
    wait_ok(pod(m[4].as_str().unwrap(), None), "final pod");
    assert_eq!(std::fs::read(dir.join("pairs.parquet")).unwrap(), expected);
    assert_eq!(status_of(&env.run_json(dir, &format!("run-shard-{}-of-{n}.json", n - 1)), "export"), "deferred");
}

//! The remote client against scripted servers on 127.0.0.1 (DESIGN §11):
//! the request cache, concurrency, retries, failure classes, failover,
//! routing, identity and secrets.

mod server;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use prefpipe_remote::{Client, Endpoint, Error, Outcome, RemoteModel, RemoteSpec, Request, Session, Stats};
use serde_json::{json, Value};
use server::{dead_url, Reply, Seen, Server};

const KEY_VAR: &str = "PREFPIPE_REMOTE_TEST_API_KEY";
const SECRET: &str = "sk-test-SECRET-4242";

/// Every test calls this first, so the environment is set before any thread reads it.
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Backoff of at most a few ms, so retries are quick (Retry-After still wins).
        std::env::set_var("PREFPIPE_BACKOFF_BASE_MS", "1");
        std::env::set_var("PREFPIPE_BACKOFF_CAP_MS", "5");
        std::env::set_var(KEY_VAR, SECRET);
    });
}

fn model(name: &str, urls: &[&str], edit: impl FnOnce(&mut RemoteSpec)) -> RemoteModel {
    let mut spec: RemoteSpec =
        serde_json::from_value(json!({"backend": "openai", "server": "vllm", "base_urls": urls, "model": "m", "wait_ready_s": 5})).unwrap();
    edit(&mut spec);
    RemoteModel { name: name.to_string(), spec, tokenizer: None, invalid: false }
}

fn chat(i: u64) -> Request {
    Request {
        endpoint: Endpoint::V1("chat/completions"),
        body: json!({"model": "m", "messages": [{"role": "user", "content": format!("q{i}")}], "seed": i}),
        route: i,
    }
}

fn has_choices(v: &Value) -> Result<(), String> {
    v.get("choices").map(|_| ()).ok_or_else(|| "no `choices`".to_string())
}

fn send(s: &Session, chunk: usize, reqs: Vec<Request>) -> Result<Vec<Outcome>, Error> {
    s.send(chunk, "gen", reqs, &has_choices, &|_, _| {})
}

fn session(c: &Arc<Client>, store: &Path) -> Arc<Session> {
    c.session(store, "generate", "0123456789abcdef0123", 0).unwrap()
}

fn content(o: &Outcome) -> String {
    match o {
        Outcome::Ok(v) => v["choices"][0]["message"]["content"].as_str().unwrap().to_string(),
        other => panic!("not ok: {other:?}"),
    }
}

fn files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == ext)).collect();
    v.sort();
    v
}

fn err(r: Result<Vec<Outcome>, Error>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(o) => panic!("expected an error, got {o:?}"),
    }
}

#[test]
fn a_new_session_replays_from_the_cache() {
    init();
    let srv = Server::start("m", None, Reply::chat);
    let c = Client::shared(&model("replay", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    let calls = AtomicU64::new(0);
    let last = std::sync::Mutex::new((0, 0));
    let out = s
        .send(0, "gen", (0..5).map(chat).collect(), &has_choices, &|d, t| {
            calls.fetch_add(1, Ordering::SeqCst);
            *last.lock().unwrap() = (d, t);
        })
        .unwrap();
    assert_eq!(content(&out[3]), "re: q3");
    // One progress call per outcome, the last one (5, 5).
    assert_eq!((calls.load(Ordering::SeqCst), *last.lock().unwrap()), (5, (5, 5)));
    assert_eq!(s.stats(), Stats { sent: 5, ..Stats::default() });

    // A later run (new session): 0 sent, 5 from the cache, same answers.
    let s2 = session(&c, store.path());
    let again = send(&s2, 0, (0..5).map(chat).collect()).unwrap();
    assert_eq!(again, out);
    assert_eq!(s2.stats(), Stats { from_cache: 5, ..Stats::default() });
    // Another chunking and stage key still find them (the index spans every file of the stage);
    // request 5 is new: 1 sent.
    let s3 = c.session(store.path(), "generate", "ffffffffffffffff", 0).unwrap();
    send(&s3, 7, (3..6).map(chat).collect()).unwrap();
    assert_eq!(s3.stats(), Stats { sent: 1, from_cache: 2, ..Stats::default() });
    assert_eq!(srv.posts(), 6);
}

#[test]
fn a_chunk_folds_into_parquet_and_replays_from_it() {
    init();
    let srv = Server::start("m", None, Reply::chat);
    let c = Client::shared(&model("fold", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    send(&s, 2, (0..4).map(chat).collect()).unwrap();
    let dir = store.path().join("requests/generate");
    // One Parquet file named (stage key16, chunk, tag); the log is gone.
    assert_eq!(files(&dir, "parquet"), vec![dir.join("0123456789abcdef-000002-gen.parquet")]);
    assert!(files(&dir, "log").is_empty());
    let f = std::fs::File::open(dir.join("0123456789abcdef-000002-gen.parquet")).unwrap();
    let rows: usize = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    // 4 requests, 4 rows.
    assert_eq!(rows, 4);

    let s2 = session(&c, store.path());
    let out = send(&s2, 2, (0..4).map(chat).collect()).unwrap();
    assert_eq!(content(&out[0]), "re: q0");
    assert_eq!(s2.stats(), Stats { from_cache: 4, ..Stats::default() });
    assert_eq!(srv.posts(), 4);
}

#[test]
fn a_torn_log_tail_is_ignored() {
    init();
    // q2 is answered late and malformed the first time, so the call fails after q0 and q1 are logged.
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let srv = Server::start("m", None, move |seen: &Seen| {
        if seen.content() == "q2" && b.swap(false, Ordering::SeqCst) {
            Reply::text(200, "oops").after(Duration::from_millis(300))
        } else {
            Reply::chat(seen)
        }
    });
    let c = Client::shared(&model("torn", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    assert!(err(send(&s, 0, (0..3).map(chat).collect())).contains("request 2"));
    let dir = store.path().join("requests/generate");
    let log = dir.join("0123456789abcdef-000000-gen.log");
    let good = std::fs::metadata(&log).unwrap().len();
    // Two records: 4-byte length + 32-byte key + body each.
    let bodies: u64 =
        srv.seen().iter().filter(|x| x.method == "POST" && x.content() != "q2").map(|x| Reply::chat(x).body.len() as u64).sum();
    assert_eq!(good, 2 * 36 + bodies);
    // A kill -9 mid-write leaves half a record.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(&500u32.to_le_bytes()).unwrap();
    f.write_all(&[7u8; 40]).unwrap();
    drop(f);

    let s2 = session(&c, store.path());
    // Opening a session only reads the log (shards read each other's growing
    // logs): the torn record is ignored, and truncated by the writer when it
    // next appends (cache.rs `torn_tail_is_ignored_and_truncated`).
    assert_eq!(std::fs::metadata(&log).unwrap().len(), good + 44);
    let out = send(&s2, 0, (0..3).map(chat).collect()).unwrap();
    assert_eq!(content(&out[2]), "re: q2");
    // q0, q1 from the log; q2 sent again.
    assert_eq!(s2.stats(), Stats { sent: 1, from_cache: 2, ..Stats::default() });
    assert!(!log.exists());
    assert_eq!(files(&dir, "parquet").len(), 1);
}

#[test]
fn in_flight_requests_stay_under_max_concurrency() {
    init();
    let srv = Server::start("m", None, |seen: &Seen| Reply::chat(seen).after(Duration::from_millis(15)));
    let c = Client::shared(&model("cap", &[&srv.base], |s| s.max_concurrency = 3)).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    // 4 threads × 2 chunks × 10 requests, all at once on one client.
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let s = s.clone();
            scope.spawn(move || {
                for k in 0..2u64 {
                    let chunk = (t * 2 + k) as usize;
                    let out = send(&s, chunk, (0..10).map(|i| chat(chunk as u64 * 100 + i)).collect()).unwrap();
                    assert_eq!(out.len(), 10);
                }
            });
        }
    });
    assert_eq!(srv.posts(), 80);
    assert_eq!(s.stats().sent, 80);
    // max_concurrency = 3 per base URL; 80 requests of 15 ms each fill it.
    assert!(srv.max_in_flight() <= 3, "{}", srv.max_in_flight());
    assert!(srv.max_in_flight() >= 2, "{}", srv.max_in_flight());
}

#[test]
fn retry_after_is_honoured() {
    init();
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let srv = Server::start("m", None, move |seen: &Seen| {
        if f.swap(false, Ordering::SeqCst) {
            Reply::text(429, r#"{"error":{"message":"rate limited"}}"#).header("Retry-After", "1")
        } else {
            Reply::chat(seen)
        }
    });
    let c = Client::shared(&model("retry-after", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    let t = Instant::now();
    let out = send(&s, 0, vec![chat(0)]).unwrap();
    assert_eq!(content(&out[0]), "re: q0");
    // The backoff is ≤ 5 ms here (PREFPIPE_BACKOFF_CAP_MS), so waiting ≥ 1 s means Retry-After: 1 was used.
    assert!(t.elapsed() >= Duration::from_secs(1));
    // One 429, then one 200: 2 attempts, 1 retry.
    assert_eq!(srv.posts(), 2);
    assert_eq!(s.stats(), Stats { sent: 1, retried: 1, ..Stats::default() });
}

#[test]
fn a_slow_answer_times_out_and_is_retried() {
    init();
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let srv = Server::start("m", None, move |seen: &Seen| {
        let late = if f.swap(false, Ordering::SeqCst) { Duration::from_secs(3) } else { Duration::ZERO };
        Reply::chat(seen).after(late)
    });
    let c = Client::shared(&model("slow", &[&srv.base], |s| s.timeout_s = 0.3)).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    let out = send(&s, 0, vec![chat(0)]).unwrap();
    assert_eq!(content(&out[0]), "re: q0");
    // The 3 s answer is abandoned at timeout_s = 0.3 s; the retry is answered at once.
    assert_eq!(s.stats(), Stats { sent: 1, retried: 1, ..Stats::default() });
    assert_eq!(srv.posts(), 2);
}

#[test]
fn failed_requests_drop_within_max_failed_rows_then_fail() {
    init();
    let srv = Server::start("m", None, |seen: &Seen| match seen.content().as_str() {
        "q1" | "q2" => Reply::text(503, "overloaded"),
        _ => Reply::chat(seen),
    });
    let c = Client::shared(&model("failed", &[&srv.base], |s| s.max_retries = 2)).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = c.session(store.path(), "generate", "0123456789abcdef", 1).unwrap();
    let out = send(&s, 0, vec![chat(0), chat(1)]).unwrap();
    assert!(
        matches!(&out[1], Outcome::Dropped { reason: "request_failed", message } if message.contains("HTTP 503: overloaded")),
        "{:?}",
        out[1]
    );
    // q0: 1 attempt; q1: 1 + max_retries (2) attempts.
    assert_eq!(srv.posts(), 4);
    assert_eq!(s.stats(), Stats { sent: 1, retried: 2, failed: 1, ..Stats::default() });
    // A second failure exceeds max_failed_rows = 1.
    let e = err(send(&s, 1, vec![chat(2)]));
    assert!(e.contains("HTTP 503: overloaded") && e.contains("127.0.0.1") && e.contains("max_failed_rows 1"), "{e}");
    assert_eq!(s.stats().failed, 2);
    // Failed requests are not cached: q1 is sent again by a new session.
    let s2 = c.session(store.path(), "generate", "0123456789abcdef", 5).unwrap();
    send(&s2, 0, vec![chat(0), chat(1)]).unwrap();
    assert_eq!(s2.stats(), Stats { from_cache: 1, retried: 2, failed: 1, ..Stats::default() });
}

#[test]
fn context_errors_drop_the_row_as_prompt_too_long() {
    init();
    let srv = Server::start("m", None, |seen: &Seen| match seen.content().as_str() {
        // vLLM's wording and shape.
        "q1" => Reply::json(
            400,
            json!({"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested 4000 tokens.", "type": "BadRequestError", "code": 400}),
        ),
        // llama.cpp's error type.
        "q2" => Reply::json(
            400,
            json!({"error": {"code": 400, "message": "request exceeds the available context size", "type": "exceed_context_size_error"}}),
        ),
        _ => Reply::chat(seen),
    });
    let c = Client::shared(&model("too-long", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    let out = send(&s, 0, (0..3).map(chat).collect()).unwrap();
    for o in &out[1..] {
        assert!(matches!(o, Outcome::Dropped { reason: "prompt_too_long", .. }), "{o:?}");
    }
    // Never retried; 2 dropped, 3 answered.
    assert_eq!(s.stats(), Stats { sent: 3, dropped: 2, ..Stats::default() });
    assert_eq!(srv.posts(), 3);
}

#[test]
fn other_4xx_fail_the_stage_or_drop_the_row() {
    init();
    let script = |seen: &Seen| match seen.content().as_str() {
        // Late, so q0's answer is stored before the call fails.
        "q1" => {
            Reply::json(400, json!({"error": {"message": "Invalid value for temperature", "type": "invalid_request_error", "code": null}}))
                .after(Duration::from_millis(200))
        }
        _ => Reply::chat(seen),
    };
    let srv = Server::start("m", None, script);
    let c = Client::shared(&model("reject-fail", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let e = err(send(&session(&c, store.path()), 0, (0..2).map(chat).collect()));
    let url = format!("{}/chat/completions", srv.base);
    assert!(e.contains("HTTP 400") && e.contains("Invalid value for temperature") && e.contains(&url) && e.contains("request 1"), "{e}");

    let c =
        Client::shared(&model("reject-drop", &[&srv.base], |s| s.on_request_error = prefpipe_core::remote::OnRequestError::Drop)).unwrap();
    let s = session(&c, store.path());
    let out = send(&s, 0, (0..2).map(chat).collect()).unwrap();
    assert!(
        matches!(&out[1], Outcome::Dropped { reason: "request_rejected", message } if message.contains("Invalid value")),
        "{:?}",
        out[1]
    );
    // q0 came from the cache the failed call left; q1 was sent and dropped.
    assert_eq!(s.stats(), Stats { sent: 1, from_cache: 1, dropped: 1, ..Stats::default() });
}

#[test]
fn a_malformed_200_fails_naming_the_request() {
    init();
    let srv = Server::start("m", None, |seen: &Seen| match seen.content().as_str() {
        "q1" => Reply::text(200, "<html>gateway says hi</html>").after(Duration::from_millis(200)),
        "q2" => Reply::json(200, json!({"object": "chat.completion"})).after(Duration::from_millis(200)),
        _ => Reply::chat(seen),
    });
    let c = Client::shared(&model("malformed", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    let e = err(send(&s, 0, vec![chat(0), chat(1)]));
    let url = format!("{}/chat/completions", srv.base);
    assert!(e.contains("request 1") && e.contains(&url) && e.contains("not JSON") && e.contains("<html>gateway says hi</html>"), "{e}");
    let e = err(send(&s, 1, vec![chat(2)]));
    assert!(e.contains("request 0") && e.contains("no `choices`") && e.contains(r#"{"object":"chat.completion"}"#), "{e}");
    // Only q0 was good: a new session finds it alone.
    let s2 = session(&c, store.path());
    let _ = send(&s2, 0, vec![chat(0), chat(1)]);
    assert_eq!(s2.stats().from_cache, 1);
}

#[test]
fn two_base_urls_share_the_load_and_routes_stick() {
    init();
    let a = Server::start("m", None, Reply::chat);
    let b = Server::start("m", None, Reply::chat);
    let c = Client::shared(&model("two", &[&a.base, &b.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    send(&s, 0, (0..10).map(chat).collect()).unwrap();
    // Routes 0..10: even → a, odd → b (route % 2).
    assert_eq!((a.posts(), b.posts()), (5, 5));
    // Three samples each of prompts routed 7 and 8: all of one prompt on one server.
    let samples: Vec<Request> = (0..6).map(|i| Request { route: 7 + i / 3, ..chat(100 + i) }).collect();
    send(&s, 1, samples).unwrap();
    let sampled = |srv: &Server| -> Vec<String> {
        let mut v: Vec<String> =
            srv.seen().iter().filter(|x| x.method == "POST").map(Seen::content).filter(|c| c.starts_with("q10")).collect();
        v.sort();
        v
    };
    // Route 7 % 2 = 1 → b; route 8 % 2 = 0 → a.
    assert_eq!(sampled(&b), ["q100", "q101", "q102"]);
    assert_eq!(sampled(&a), ["q103", "q104", "q105"]);
}

#[test]
fn an_endpoint_down_at_start_leaves_the_rotation() {
    init();
    let a = Server::start("m", None, Reply::chat);
    let dead = dead_url();
    let c = Client::shared(&model("down-at-start", &[&dead, &a.base], |s| s.wait_ready_s = 0.3)).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    send(&s, 0, (0..6).map(chat).collect()).unwrap();
    // All 6 on the one live server, none retried.
    assert_eq!(a.posts(), 6);
    assert_eq!(s.stats(), Stats { sent: 6, ..Stats::default() });

    // Nothing ready: an error naming the URL without its credentials.
    let dead2 = dead_url().replace("http://", "http://user:hunter2@");
    let c = Client::shared(&model("none-ready", &[&dead2], |s| s.wait_ready_s = 0.2)).unwrap();
    let e = c.connect().unwrap_err().to_string();
    assert!(e.contains(&prefpipe_core::remote::redact_url(&dead2)) && !e.contains("hunter2"), "{e}");
}

#[test]
fn an_endpoint_failing_mid_run_hands_its_requests_to_the_other() {
    init();
    let a = Server::start("m", None, Reply::chat);
    let b = Server::start("m", None, |_: &Seen| Reply::text(503, "down"));
    let c = Client::shared(&model("failover", &[&a.base, &b.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    let out = send(&s, 0, (0..20).map(chat).collect()).unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Ok(_))));
    // Every request ends on a; b saw at least the 5 consecutive failures that retire it.
    assert_eq!(a.posts(), 20);
    assert!(b.posts() >= 5, "{}", b.posts());
    // Each 503 was followed by one retry.
    assert_eq!(s.stats(), Stats { sent: 20, retried: b.posts(), ..Stats::default() });
}

#[test]
fn the_api_key_never_leaves_the_authorization_header() {
    init();
    let srv = Server::start("m", None, |seen: &Seen| match seen.content().as_str() {
        // A server that echoes the request's header into its error.
        "q1" => {
            Reply::json(400, json!({"error": {"message": format!("bad request ({})", seen.authorization.clone().unwrap_or_default())}}))
        }
        _ => Reply::chat(seen),
    });
    let m = model("secret", &[&srv.base], |s| s.api_key_env = Some(KEY_VAR.into()));
    let c = Client::shared(&m).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = session(&c, store.path());
    send(&s, 0, vec![chat(0)]).unwrap();
    let e = err(send(&s, 1, vec![chat(0), chat(1)]));
    assert!(e.contains("bad request (Bearer <redacted>)") && !e.contains(SECRET), "{e}");
    // Sent as a bearer token on every request, the models GET included.
    assert!(srv.seen().iter().all(|x| x.authorization.as_deref() == Some(&format!("Bearer {SECRET}"))));
    for shown in [format!("{c:?}"), format!("{s:?}"), c.info().to_string(), format!("{m:?}")] {
        assert!(!shown.contains(SECRET), "{shown}");
    }
    for entry in walk(store.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "{}", entry.display());
    }
    // Credentials in a URL are never shown either.
    let with_pw = srv.base.replace("http://", "http://user:hunter2@");
    let c = Client::shared(&model("url-secret", &[&with_pw], |_| {})).unwrap();
    assert!(!c.info().to_string().contains("hunter2") && c.info()["base_urls"][0] == srv.base.as_str());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_served_root_is_part_of_the_cache_key() {
    init();
    let r1 = Server::start("m", Some("/models/m@rev1"), Reply::chat);
    let c = Client::shared(&model("root-1", &[&r1.base], |s| s.revision = Some("rev1".into()))).unwrap();
    let id = c.connect().unwrap();
    assert_eq!((id.model.as_str(), id.revision.as_deref(), id.root.as_deref()), ("m", Some("rev1"), Some("/models/m@rev1")));
    assert_eq!(
        c.info(),
        json!({"backend": "openai", "server": "vllm", "base_urls": [r1.base], "model": "m", "revision": "rev1", "root": "/models/m@rev1"})
    );
    let store = tempfile::tempdir().unwrap();
    send(&session(&c, store.path()), 0, (0..3).map(chat).collect()).unwrap();

    // Another server with the same weights: the base URL is not in the key, so all 3 replay.
    let same = Server::start("m", Some("/models/m@rev1"), Reply::chat);
    let c2 = Client::shared(&model("root-2", &[&same.base], |s| s.revision = Some("rev1".into()))).unwrap();
    let s2 = session(&c2, store.path());
    send(&s2, 0, (0..3).map(chat).collect()).unwrap();
    assert_eq!((s2.stats().from_cache, same.posts()), (3, 0));

    // Restarted with new weights under the same name: nothing replays.
    let new = Server::start("m", Some("/models/m@rev2"), Reply::chat);
    let c3 = Client::shared(&model("root-3", &[&new.base], |s| s.revision = Some("rev1".into()))).unwrap();
    let s3 = session(&c3, store.path());
    send(&s3, 0, (0..3).map(chat).collect()).unwrap();
    assert_eq!(s3.stats(), Stats { sent: 3, ..Stats::default() });
}

#[test]
fn root_endpoints_drop_the_v1_suffix() {
    init();
    let srv = Server::start("m", None, |_: &Seen| Reply::json(200, json!({"data": [{"index": 0, "probs": [1.5]}]})));
    let c = Client::shared(&model("classify", &[&srv.base], |_| {})).unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = c.session(store.path(), "score", "abc", 0).unwrap();
    let req =
        Request { endpoint: Endpoint::Root("classify"), body: json!({"model": "m", "input": "x", "use_activation": false}), route: 0 };
    let out = s.send(0, "rm0", vec![req], &|v: &Value| v.get("data").map(|_| ()).ok_or("no data".into()), &|_, _| {}).unwrap();
    assert_eq!(out[0], Outcome::Ok(json!({"data": [{"index": 0, "probs": [1.5]}]})));
    assert!(srv.seen().iter().any(|x| x.method == "POST" && x.path == "/classify"));
}

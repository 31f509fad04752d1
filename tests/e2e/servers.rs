//! Test servers: the Python scripts in tests/servers/ (scripted OpenAI server,
//! vLLM-shaped transformers server, real llama.cpp), run from the repository's
//! `.venv`. Each prints `PORT <n>` once it listens on 127.0.0.1; `Drop` kills it.
//!
//! Missing prerequisites panic with the command that installs them — tests
//! never skip silently (CI runs both scripts).

#![allow(dead_code)] // not every test uses every helper

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to print `PORT n` (model loading included).
const START_DEADLINE: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The stamp `scripts/setup-venv.sh` writes when the venv is complete, read
/// from the script's `stamp=` line so the two cannot drift apart (a stale
/// hard-coded name once passed on an old venv and failed every server test
/// on a fresh CI machine).
fn venv_stamp(root: &std::path::Path) -> PathBuf {
    let script = root.join("scripts/setup-venv.sh");
    let text = std::fs::read_to_string(&script).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let line =
        text.lines().find_map(|l| l.trim().strip_prefix("stamp=")).unwrap_or_else(|| panic!("{} has no `stamp=` line", script.display()));
    PathBuf::from(line.trim())
}

/// `.venv/bin/python`, made by `scripts/setup-venv.sh`.
pub fn venv_python() -> PathBuf {
    let root = root();
    let python = root.join(".venv/bin/python");
    let stamp = root.join(venv_stamp(&root));
    if !python.exists() || !stamp.exists() {
        panic!("the test venv is missing or incomplete ({} / {}): run scripts/setup-venv.sh", python.display(), stamp.display());
    }
    python
}

/// SmolLM2-135M-Instruct Q4_1 GGUF, fetched by `scripts/fetch-smollm2.sh`.
pub fn smollm2() -> PathBuf {
    let gguf = root().join("data-samples/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        panic!("{} is missing: run scripts/fetch-smollm2.sh", gguf.display());
    }
    gguf
}

/// A running test server; killed (by PID) and reaped on drop.
pub struct Server {
    pub port: u16,
    child: Child,
    stderr: PathBuf,
}

enum Line {
    Port(u16),
    Eof,
}

impl Server {
    /// Runs `.venv/bin/python tests/servers/<script> ARGS…` from the repository
    /// root and waits (at most 120 s) for its `PORT n` line.
    pub fn start(script: &str, args: &[&str]) -> Server {
        let python = venv_python();
        if script == "llamacpp.py" {
            smollm2();
        }
        let root = root();
        let path = root.join("tests/servers").join(script);
        assert!(path.exists(), "no test server {}", path.display());

        // stderr goes to a file: a pipe nobody drains would block a chatty
        // server (llama.cpp logs every request) once it fills.
        static N: AtomicUsize = AtomicUsize::new(0);
        let stderr = std::env::temp_dir().join(format!(
            "prefpipe-server-{}-{}-{}.log",
            script.trim_end_matches(".py"),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let err_file = File::create(&stderr).expect("creates the server's stderr file");
        let mut child = Command::new(&python)
            .arg(&path)
            .args(args)
            .current_dir(&root)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python.display(), path.display()));

        // A reader thread, so the deadline holds even if the server prints
        // nothing; it keeps draining stdout after the PORT line.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(port) = line.strip_prefix("PORT ").and_then(|p| p.trim().parse().ok()) {
                        sent = true;
                        let _ = tx.send(Line::Port(port));
                    }
                }
            }
            let _ = tx.send(Line::Eof);
        });

        let started = Instant::now();
        let mut server = Server { port: 0, child, stderr };
        match rx.recv_timeout(START_DEADLINE) {
            Ok(Line::Port(port)) => {
                server.port = port;
                server
            }
            Ok(Line::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.child.wait().ok();
                panic!("test server {script} {args:?} exited before printing PORT ({status:?}); stderr:\n{}", server.stderr_text());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "test server {script} {args:?} printed no PORT line within {:?}; stderr:\n{}",
                    started.elapsed(),
                    server.stderr_text()
                );
            }
        }
    }

    /// The OpenAI base URL, `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The server root, `http://127.0.0.1:PORT` (vLLM's `/classify`, `/health`).
    pub fn root_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the server wrote to stderr so far (for assertion messages).
    pub fn stderr_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.stderr) {
            let _ = f.read_to_string(&mut s);
        }
        // The tail is what explains a failure; llama.cpp's log is long.
        const TAIL: usize = 8000;
        if s.len() > TAIL {
            let mut cut = s.len() - TAIL;
            while !s.is_char_boundary(cut) {
                cut += 1;
            }
            s = format!("…{}", &s[cut..]);
        }
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this PID only; then reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

//! A tiny scripted HTTP/1.1 server on 127.0.0.1 for the client tests: it
//! answers `GET …/models` with one model entry, every POST with what the
//! script says, and counts requests and the most in flight at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

impl Seen {
    /// `messages[0].content` of a chat request ("" otherwise).
    pub fn content(&self) -> String {
        self.body["messages"][0]["content"].as_str().unwrap_or("").to_string()
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, v: Value) -> Reply {
        Reply::text(status, &v.to_string())
    }
    pub fn text(status: u16, body: &str) -> Reply {
        Reply { status, headers: Vec::new(), body: body.to_string(), delay: Duration::ZERO }
    }
    /// A chat completion that echoes the request's content.
    pub fn chat(seen: &Seen) -> Reply {
        Reply::json(
            200,
            json!({"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("re: {}", seen.content())}, "finish_reason": "stop"}]}),
        )
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn after(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

struct State {
    model: String,
    root: Option<String>,
    script: Box<Script>,
    posts: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    seen: Mutex<Vec<Seen>>,
}

pub struct Server {
    /// `http://127.0.0.1:PORT/v1`
    pub base: String,
    state: Arc<State>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Server {
    /// Serves `model` (with `root` in its models entry) and answers POSTs by `script`.
    pub fn start(model: &str, root: Option<&str>, script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            model: model.to_string(),
            root: root.map(str::to_string),
            script: Box::new(script),
            posts: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        rt.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, st.clone()));
            }
        });
        Server { base: format!("http://127.0.0.1:{port}/v1"), state, rt: Some(rt) }
    }

    /// POSTs received (every attempt).
    pub fn posts(&self) -> u64 {
        self.state.posts.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

/// A base URL on which nothing listens (connection refused).
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/v1")
}

async fn serve(mut sock: TcpStream, st: Arc<State>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Headers.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut tmp = [0u8; 8192];
            match sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let mut len = 0usize;
        let mut authorization = None;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "authorization" => authorization = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        while buf.len() < head_end + len {
            let mut tmp = [0u8; 8192];
            match sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
        buf.drain(..head_end + len);
        let seen = Seen { method, path, authorization, body };
        st.seen.lock().unwrap().push(seen.clone());

        let reply = if seen.method == "GET" && seen.path.ends_with("/models") {
            Reply::json(200, json!({"object": "list", "data": [{"id": st.model, "object": "model", "root": st.root}]}))
        } else {
            st.posts.fetch_add(1, Ordering::SeqCst);
            let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            st.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let r = (st.script)(&seen);
            tokio::time::sleep(r.delay).await;
            st.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
        };
        let mut out = format!("HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", reply.status, reply.body.len());
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&reply.body);
        if sock.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

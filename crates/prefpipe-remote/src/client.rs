//! The process-wide client of one remote `models:` entry: its HTTP
//! connection pool, its base URLs with their in-flight limits, readiness at
//! start, and one request's attempts (retries, backoff, failover).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use prefpipe_core::remote::RemoteModel;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde_json::{json, Value};

use crate::classify::{classify, server_message, Verdict};
use crate::endpoint::{Endpoint, Ep, Rotation};
use crate::retry::{parse_retry_after, Backoff};
use crate::session::Session;
use crate::{excerpt, runtime, Error, Identity};

/// One remote model's client, shared by every stage and chunk that uses it.
pub struct Client {
    model: RemoteModel,
    /// Never printed, logged, stored or hashed; sent as `Authorization: Bearer`.
    api_key: Option<String>,
    http: reqwest::Client,
    rotation: Rotation,
    backoff: Backoff,
    timeout: Duration,
    identity: OnceLock<Identity>,
    /// Held while one thread waits for the servers; the others wait for it.
    connecting: Mutex<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.model.name)
            .field("base_urls", &self.rotation.redacted())
            .field("model", &self.model.spec.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The final answer to one request, after any retries.
pub(crate) enum Answer {
    /// A 2xx body, and the (redacted) URL that gave it.
    Body {
        bytes: Vec<u8>,
        url: String,
    },
    TooLong(String),
    Rejected(String),
    /// Retries exhausted: the last error.
    Exhausted(String),
}

/// A reqwest error without its URL (which may hold credentials), with its causes.
fn transport_error(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut msg = format!("{kind}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

impl Client {
    /// The process-wide client of one `models:` entry (keyed by entry name
    /// and spec), so every stage and chunk shares its concurrency limits.
    /// Reads the API key from `spec.api_key_env` (only there). No I/O.
    pub fn shared(m: &RemoteModel) -> Result<Arc<Client>, Error> {
        static CLIENTS: OnceLock<Mutex<HashMap<String, Arc<Client>>>> = OnceLock::new();
        let urls = m.spec.urls();
        let spec = serde_json::to_string(&m.spec).map_err(|e| Error::rt(format!("model `{}`: {e}", m.name)))?;
        let key = format!("{}\0{spec}\0{}", m.name, urls.join(" "));
        let mut clients = lock(CLIENTS.get_or_init(Default::default));
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = Arc::new(Client::new(m, &urls)?);
        clients.insert(key, c.clone());
        Ok(c)
    }

    fn new(m: &RemoteModel, urls: &[String]) -> Result<Client, Error> {
        let spec = &m.spec;
        if urls.is_empty() {
            return Err(Error::rt(format!("model `{}`: no base URL (give `base_url`, `base_urls` or `base_url_env`)", m.name)));
        }
        let api_key = match &spec.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(k),
                _ => return Err(Error::rt(format!("model `{}`: the environment variable `{var}` (the API key) is not set", m.name))),
            },
        };
        if let Some(k) = &api_key {
            if HeaderValue::from_str(&format!("Bearer {k}")).is_err() {
                return Err(Error::rt(format!(
                    "model `{}`: the API key in `{}` is not a valid header value",
                    m.name,
                    spec.api_key_env.as_deref().unwrap_or("")
                )));
            }
        }
        let timeout = if spec.timeout_s.is_finite() && spec.timeout_s > 0.0 {
            Duration::from_secs_f64(spec.timeout_s)
        } else {
            Duration::from_secs(600)
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("prefpipe/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| Error::rt(format!("model `{}`: cannot build the HTTP client: {}", m.name, transport_error(e))))?;
        Ok(Client {
            model: m.clone(),
            api_key,
            http,
            rotation: Rotation { eps: urls.iter().map(|u| Ep::new(u, spec.max_concurrency)).collect() },
            backoff: Backoff::from_env(),
            timeout,
            identity: OnceLock::new(),
            connecting: Mutex::new(()),
        })
    }

    /// The `models:` entry.
    pub fn model(&self) -> &RemoteModel {
        &self.model
    }

    /// Removes the API key from a message that may quote a server.
    pub(crate) fn scrub(&self, s: String) -> String {
        match &self.api_key {
            Some(k) if s.contains(k.as_str()) => s.replace(k.as_str(), "<redacted>"),
            _ => s,
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url).timeout(self.timeout);
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// Once per process: waits up to `wait_ready_s` for each base URL to
    /// answer `GET {base_url}/models` with 200 and reads the `root` of the
    /// entry whose `id` is the model. An endpoint that never becomes ready
    /// leaves the rotation (logged once); none ready is an error.
    pub fn connect(&self) -> Result<Identity, Error> {
        let _one = lock(&self.connecting);
        if let Some(id) = self.identity.get() {
            return Ok(id.clone());
        }
        let polls = runtime::block_on(futures_util::future::join_all(self.rotation.eps.iter().map(|ep| self.poll_ready(ep))))?;
        let spec = &self.model.spec;
        let mut roots: Vec<(String, String)> = Vec::new();
        let mut down = Vec::new();
        for (ep, poll) in self.rotation.eps.iter().zip(polls) {
            match poll? {
                Ok(root) => {
                    ep.revive();
                    roots.extend(root.map(|r| (ep.redacted.clone(), r)));
                }
                Err(why) => {
                    if self.rotation.eps.len() > 1 {
                        eprintln!(
                            "prefpipe-remote: {} did not answer GET /models within {} s ({why}); leaving it out of rotation",
                            ep.redacted, spec.wait_ready_s
                        );
                    }
                    ep.retire();
                    down.push(format!("{} ({why})", ep.redacted));
                }
            }
        }
        if down.len() == self.rotation.eps.len() {
            return Err(Error::rt(self.scrub(format!(
                "model `{}`: no server answered GET /models with 200 within {} s: {}",
                self.model.name,
                spec.wait_ready_s,
                down.join(", ")
            ))));
        }
        if let Some((u2, r2)) = roots.iter().find(|(_, r)| *r != roots[0].1) {
            return Err(Error::rt(format!(
                "model `{}`: the servers serve different weights: {} reports root `{}`, {u2} reports `{r2}`",
                self.model.name, roots[0].0, roots[0].1
            )));
        }
        let id = Identity { model: spec.model.clone(), revision: spec.revision.clone(), root: roots.first().map(|(_, r)| r.clone()) };
        Ok(self.identity.get_or_init(|| id).clone())
    }

    /// Polls one endpoint: `Ok(Ok(root))` once ready, `Ok(Err(last error))`
    /// at the deadline, `Err` when the server refuses our credentials.
    async fn poll_ready(&self, ep: &Ep) -> Result<Result<Option<String>, String>, Error> {
        let wait = Duration::from_secs_f64(self.model.spec.wait_ready_s.clamp(0.0, 1e9));
        let deadline = tokio::time::Instant::now() + wait;
        let url = format!("{}/models", ep.url);
        let mut pause = Duration::from_millis(250);
        loop {
            let last = match self.request(reqwest::Method::GET, &url).timeout(self.timeout.min(Duration::from_secs(10))).send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                    if (200..300).contains(&status) {
                        return Ok(Ok(root_of(&body, &self.model.spec.model)));
                    }
                    if status == 401 || status == 403 {
                        return Err(Error::rt(self.scrub(format!(
                            "model `{}`: GET {}/models: HTTP {status}: {} (check the API key)",
                            self.model.name,
                            ep.redacted,
                            server_message(&body)
                        ))));
                    }
                    format!("HTTP {status}: {}", server_message(&body))
                }
                Err(e) => transport_error(e),
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Err(last));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// JSON for run.json: backend, server, redacted base URLs and the served identity.
    pub fn info(&self) -> Value {
        let spec = &self.model.spec;
        let root = self.identity.get().and_then(|i| i.root.clone());
        json!({
            "backend": spec.backend,
            "server": spec.server.as_str(),
            "base_urls": self.rotation.redacted(),
            "model": spec.model,
            "revision": spec.revision,
            "root": root,
        })
    }

    /// The request cache and counters of one stage run; connects first
    /// (once per process) to learn the served identity.
    pub fn session(
        self: &Arc<Self>,
        store_root: &Path,
        stage_id: &str,
        stage_key: &str,
        max_failed_rows: u64,
    ) -> Result<Arc<Session>, Error> {
        let identity = self.connect()?;
        Session::open(self.clone(), identity, store_root, stage_id, stage_key, max_failed_rows).map(Arc::new)
    }

    pub(crate) fn max_retries(&self) -> u32 {
        self.model.spec.max_retries
    }

    pub(crate) fn drops_rejected(&self) -> bool {
        self.model.spec.on_request_error == prefpipe_core::remote::OnRequestError::Drop
    }

    /// Sends one request until it has a final answer: each attempt picks a
    /// live endpoint by `route` (so retries fail over), waits for one of its
    /// slots, and releases it before any backoff. `Err` only when no
    /// endpoint is left.
    pub(crate) async fn execute(&self, endpoint: Endpoint, route: u64, body: &[u8], retried: &AtomicU64) -> Result<Answer, Error> {
        let mut attempt = 0u32;
        loop {
            let Some(ep) = self.rotation.pick(route) else {
                return Err(Error::rt(format!(
                    "model `{}`: no server left in rotation ({})",
                    self.model.name,
                    self.rotation.redacted().join(", ")
                )));
            };
            let url = endpoint.url(&ep.url);
            let shown = endpoint.url(&ep.redacted);
            let sent = {
                let _slot = ep.slots.acquire().await.map_err(|_| Error::rt("the request slots were closed"))?;
                let res =
                    self.request(reqwest::Method::POST, &url).header(CONTENT_TYPE, "application/json").body(body.to_vec()).send().await;
                match res {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
                        match resp.bytes().await {
                            Ok(b) => Ok((status, b.to_vec(), retry_after)),
                            Err(e) => Err(transport_error(e)),
                        }
                    }
                    Err(e) => Err(transport_error(e)),
                }
            };
            let (message, retry_after) = match sent {
                Ok((status, bytes, retry_after)) => match classify(status, &bytes, retry_after) {
                    Verdict::Success => {
                        ep.ok();
                        return Ok(Answer::Body { bytes, url: shown });
                    }
                    Verdict::TooLong(m) => {
                        ep.ok();
                        return Ok(Answer::TooLong(self.scrub(format!("POST {shown}: {m}"))));
                    }
                    Verdict::Rejected(m) => {
                        ep.ok();
                        return Ok(Answer::Rejected(self.scrub(format!("POST {shown}: {m}"))));
                    }
                    Verdict::Retry { message, down, retry_after } => {
                        if down {
                            self.rotation.failed(ep, &message);
                        } else {
                            ep.ok();
                        }
                        (message, retry_after)
                    }
                },
                Err(message) => {
                    self.rotation.failed(ep, &message);
                    (message, None)
                }
            };
            if attempt >= self.max_retries() {
                return Ok(Answer::Exhausted(self.scrub(format!("POST {shown}: {}", excerpt(&message, 400)))));
            }
            tokio::time::sleep(self.backoff.delay(attempt, retry_after)).await;
            attempt += 1;
            retried.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The `root` of the `/v1/models` entry whose `id` is `model`, if reported.
fn root_of(body: &[u8], model: &str) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let entry = v.get("data")?.as_array()?.iter().find(|e| e.get("id").and_then(Value::as_str) == Some(model))?;
    entry.get("root").and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_read_from_the_models_list() {
        let body = br#"{"object":"list","data":[{"id":"other","root":"x"},{"id":"m","object":"model","root":"/models/m@abc"}]}"#;
        assert_eq!(root_of(body, "m").as_deref(), Some("/models/m@abc"));
        // llama.cpp-style entries without `root`, and absent models.
        assert_eq!(root_of(br#"{"data":[{"id":"m"}]}"#, "m"), None);
        assert_eq!(root_of(body, "absent"), None);
        assert_eq!(root_of(b"not json", "m"), None);
    }
}

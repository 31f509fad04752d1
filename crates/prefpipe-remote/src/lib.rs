//! prefpipe-remote: the HTTP side of remote models (DESIGN §11).
//!
//! A [`Client`] serves one `models:` entry that names an OpenAI-compatible
//! server (vLLM, SGLang, llama.cpp, an API). It keeps up to
//! `max_concurrency` requests in flight per base URL — shared by every chunk
//! and stage that uses the entry, so chunk boundaries never idle the servers —
//! routes all requests of one prompt to one base URL, retries with
//! exponential backoff and full jitter (honouring `Retry-After`), takes an
//! endpoint that keeps failing out of rotation, and classifies failures
//! (context too long → the row is dropped; other 4xx → the stage fails or
//! the row is dropped; malformed 200 → the stage fails naming the request).
//!
//! Every response is first written to the request cache ([`cache`]), then
//! used: an append-only log per (stage, chunk) under `<store>/requests/`,
//! flushed per record, folded into Parquet when the chunk completes. Any later
//! run that sends the same request (same endpoint path, canonical body and
//! served identity) reads it back instead of sending it.
//!
//! No candle here; stages in `prefpipe-stages` build the request bodies
//! (including `"model"`) and read the answers (their wire formats differ per
//! server).
//!
//! Environment: `PREFPIPE_BACKOFF_BASE_MS` (default 500) and
//! `PREFPIPE_BACKOFF_CAP_MS` (default 60000) override the base and the cap of
//! the exponential backoff (tests set them to a few ms); `Retry-After` is
//! always honoured up to 60 s.

pub mod cache;
mod classify;
mod client;
mod endpoint;
mod retry;
mod runtime;
mod session;

pub use client::Client;
pub use endpoint::Endpoint;
pub use prefpipe_core::remote::{OnRequestError, RemoteModel, RemoteSpec, ServerKind};
pub use session::Session;

use serde::Serialize;

/// A run-time failure of a remote model (exit 1): server down, retries
/// exhausted, a rejected request, a malformed answer. Messages name the
/// endpoint with any credentials removed and never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    pub(crate) fn rt(msg: impl Into<String>) -> Error {
        Error::Runtime(msg.into())
    }
}

/// What identifies the served weights: part of every request-cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The served name (the request's `model`).
    pub model: String,
    /// The configured `revision:` of the weights.
    pub revision: Option<String>,
    /// The `root` of the server's `/v1/models` entry, where it reports one.
    pub root: Option<String>,
}

/// One HTTP request of a stage.
#[derive(Debug, Clone)]
pub struct Request {
    pub endpoint: Endpoint,
    /// The JSON body, sent as is (the stage sets `model` and every sampling
    /// parameter).
    pub body: serde_json::Value,
    /// Requests with the same route go to the same base URL (all samples of
    /// one prompt: prefix caching).
    pub route: u64,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A 2xx body that passed the caller's shape check.
    Ok(serde_json::Value),
    /// The row is dropped, with one of the reasons `prompt_too_long`,
    /// `request_rejected` (`on_request_error: drop`) or `request_failed`
    /// (retries exhausted within `max_failed_rows`).
    Dropped { reason: &'static str, message: String },
}

/// Checks a 2xx body's shape before it is cached; `Err` names what is wrong.
pub type Validate<'a> = &'a (dyn Fn(&serde_json::Value) -> Result<(), String> + Sync);

/// Request counters of one stage run (for `run.json`).
#[derive(Debug, Serialize, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered by a server (each counted once, however many
    /// attempts it took).
    pub sent: u64,
    /// Requests replayed from the request cache.
    pub from_cache: u64,
    /// Extra attempts (retries) over all requests.
    pub retried: u64,
    /// Requests that still failed after `max_retries` (dropped as
    /// `request_failed`, or the one that failed the stage).
    pub failed: u64,
    /// Requests dropped as `prompt_too_long` or `request_rejected`.
    pub dropped: u64,
}

/// The first `n` characters of `s` (error messages quote server bodies).
pub(crate) fn excerpt(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

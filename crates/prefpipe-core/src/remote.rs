//! A remote `models:` entry as written (DESIGN §11): the typed, validated
//! config of an OpenAI-compatible server. No HTTP here — `prefpipe-remote`
//! turns it into a client; this module only checks the YAML and the
//! environment it names, so bad entries fail at plan time (exit 2) before any
//! request is sent.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::stage::ConfigError;

/// Wire-format quirks of the server behind an OpenAI-compatible API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    Vllm,
    Sglang,
    Llamacpp,
    /// Any other OpenAI-compatible server (chat/completions only).
    #[default]
    Openai,
}

impl ServerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::Vllm => "vllm",
            ServerKind::Sglang => "sglang",
            ServerKind::Llamacpp => "llamacpp",
            ServerKind::Openai => "openai",
        }
    }
}

/// What to do with a request the server rejects with a 4xx that is not a
/// context-length error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnRequestError {
    /// Fail the stage (exit 1) with the server's message.
    #[default]
    Fail,
    /// Drop the row as `request_rejected` (counted), e.g. content-policy refusals.
    Drop,
}

/// A `models:` entry that names a server instead of a path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    /// `openai`: any OpenAI-compatible HTTP server.
    pub backend: String,
    /// `vllm`, `sglang`, `llamacpp` or `openai` (default): wire-format quirks.
    #[serde(default)]
    pub server: ServerKind,
    /// The server's OpenAI base URL, e.g. `http://127.0.0.1:8000/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Several servers of one model; requests are spread over them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_urls: Vec<String>,
    /// Read the base URL(s) (comma- or space-separated) from this variable at run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url_env: Option<String>,
    /// The name the server serves (the request's `model`).
    #[serde(default)]
    pub model: String,
    /// The environment variable that holds the API key (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// A local Hugging Face directory whose tokenizer gives exact token ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// The weights' revision (a sha or tag): part of every cache and stage key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Requests in flight per base URL.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// Seconds per request.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Retries of a request (connection errors, timeouts, 408, 429, 5xx).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Seconds to wait at start for each server to answer its models endpoint.
    #[serde(default = "default_wait")]
    pub wait_ready_s: f64,
    /// Rows whose requests still fail after retries that a stage may drop
    /// (`request_failed`) before it fails; 0 = fail on the first.
    #[serde(default)]
    pub max_failed_rows: u64,
    /// `fail` (default) or `drop` (`request_rejected`) for other 4xx answers.
    #[serde(default)]
    pub on_request_error: OnRequestError,
}

fn default_concurrency() -> usize {
    64
}
fn default_timeout() -> f64 {
    600.0
}
fn default_retries() -> u32 {
    8
}
fn default_wait() -> f64 {
    600.0
}

impl RemoteSpec {
    /// Checks the entry and the environment it names; every problem, located
    /// by field. `tokenizer` is resolved against the pipeline's directory by
    /// the caller.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        if self.backend != "openai" {
            errs.push(ConfigError::at(
                "backend",
                format!("unknown backend `{}`; the remote backend is `openai` (any OpenAI-compatible server)", self.backend),
            ));
        }
        if self.model.trim().is_empty() {
            errs.push(ConfigError::new("a remote model needs `model:`, the name the server serves (e.g. `Qwen/Qwen2.5-7B-Instruct`)"));
        }
        let sources =
            usize::from(self.base_url.is_some()) + usize::from(!self.base_urls.is_empty()) + usize::from(self.base_url_env.is_some());
        if sources == 0 {
            errs.push(ConfigError::new("a remote model needs `base_url`, `base_urls` or `base_url_env`"));
        } else if sources > 1 {
            errs.push(ConfigError::new("give one of `base_url`, `base_urls` and `base_url_env`, not several"));
        }
        if let Some(u) = &self.base_url {
            if let Err(m) = check_url(u) {
                errs.push(ConfigError::at("base_url", m));
            }
        }
        for (i, u) in self.base_urls.iter().enumerate() {
            if let Err(m) = check_url(u) {
                errs.push(ConfigError { path: vec![key("base_urls"), crate::yaml::PathSeg::Index(i)], message: m });
            }
        }
        if let Some(v) = &self.base_url_env {
            match std::env::var(v) {
                Err(_) => errs.push(ConfigError::at("base_url_env", format!("the environment variable `{v}` is not set"))),
                Ok(s) => {
                    let urls = split_urls(&s);
                    if urls.is_empty() {
                        errs.push(ConfigError::at("base_url_env", format!("the environment variable `{v}` is empty")));
                    }
                    for u in urls {
                        if let Err(m) = check_url(&u) {
                            errs.push(ConfigError::at("base_url_env", format!("`{v}`: {m}")));
                        }
                    }
                }
            }
        }
        if let Some(v) = &self.api_key_env {
            // The value is never read into an error or a key; only whether it is set.
            if std::env::var_os(v).is_none_or(|s| s.is_empty()) {
                errs.push(ConfigError::at("api_key_env", format!("the environment variable `{v}` (the API key) is not set")));
            }
        }
        if self.max_concurrency == 0 {
            errs.push(ConfigError::at("max_concurrency", "`max_concurrency` must be at least 1"));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            errs.push(ConfigError::at("timeout_s", "`timeout_s` must be a positive number of seconds"));
        }
        if !(self.wait_ready_s.is_finite() && self.wait_ready_s >= 0.0) {
            errs.push(ConfigError::at("wait_ready_s", "`wait_ready_s` must be ≥ 0 seconds"));
        }
        errs
    }

    /// The base URLs, in order (from `base_url`, `base_urls` or `base_url_env`),
    /// without a trailing `/`.
    pub fn urls(&self) -> Vec<String> {
        let raw = if let Some(u) = &self.base_url {
            vec![u.clone()]
        } else if !self.base_urls.is_empty() {
            self.base_urls.clone()
        } else if let Some(v) = &self.base_url_env {
            split_urls(&std::env::var(v).unwrap_or_default())
        } else {
            Vec::new()
        };
        raw.into_iter().map(|u| u.trim_end_matches('/').to_string()).collect()
    }

    /// What identifies the served weights in stage keys: never a URL or a
    /// secret (DESIGN §11 "Identity"; the server's `root` joins the request
    /// keys at run time).
    pub fn identity(&self) -> String {
        format!("remote:{}:{}:{}", self.server.as_str(), self.model, self.revision.as_deref().unwrap_or(""))
    }
}

fn key(s: &str) -> crate::yaml::PathSeg {
    crate::yaml::PathSeg::Key(s.to_string())
}

/// `a, b c` → [a, b, c].
pub fn split_urls(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace()).filter(|p| !p.is_empty()).map(str::to_string).collect()
}

/// An `http://` or `https://` URL with a host.
pub fn check_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or_else(|| format!("`{}` is not an http:// or https:// URL", redact_url(u)))?;
    let host_port = rest.split('/').next().unwrap_or("");
    let host_port = host_port.rsplit('@').next().unwrap_or("");
    let host = if let Some(h) = host_port.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace()) {
        return Err(format!("`{}` has no host", redact_url(u)));
    }
    if let Some(port) = host_port.strip_prefix('[').and_then(|h| h.split_once("]:")).map(|x| x.1).or_else(|| {
        if host_port.starts_with('[') {
            None
        } else {
            host_port.split_once(':').map(|x| x.1)
        }
    }) {
        if port.parse::<u16>().is_err() {
            return Err(format!("`{}` has a bad port `{port}`", redact_url(u)));
        }
    }
    Ok(())
}

/// A URL with any `user:password@` removed (for run.json, logs and errors).
pub fn redact_url(u: &str) -> String {
    let (scheme, rest) = match u.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), u),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    format!("{scheme}{authority}{path}")
}

/// A remote entry after planning: the spec plus its tokenizer resolved.
#[derive(Debug, Clone)]
pub struct RemoteModel {
    /// The `models:` name.
    pub name: String,
    pub spec: RemoteSpec,
    /// `tokenizer:` resolved against the pipeline's directory.
    pub tokenizer: Option<PathBuf>,
    /// The entry has errors (already reported): stages naming it check nothing more.
    pub invalid: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://127.0.0.1:8000/v1").is_ok());
        assert!(check_url("https://api.example.com/v1").is_ok());
        assert!(check_url("http://[::1]:80/v1").is_ok());
        assert!(check_url("127.0.0.1:8000").unwrap_err().contains("not an http"));
        assert!(check_url("http:///v1").unwrap_err().contains("no host"));
        assert!(check_url("http://h:99999/v1").unwrap_err().contains("bad port"));
        // Credentials never reach a message.
        assert!(!check_url("ftp://u:secret@h").unwrap_err().contains("secret"));
        assert_eq!(redact_url("http://u:secret@h:1/v1"), "http://h:1/v1");
    }

    fn spec(json: serde_json::Value) -> RemoteSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn entries_are_validated() {
        let ok = spec(serde_json::json!({"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}));
        assert!(ok.validate().is_empty());
        assert_eq!(ok.max_concurrency, 64);
        let bad = spec(serde_json::json!({"backend": "grpc", "base_url": "nope", "api_key_env": "PREFPIPE_TEST_SURELY_UNSET_KEY"}));
        let msgs: Vec<String> = bad.validate().into_iter().map(|e| e.message).collect();
        assert_eq!(msgs.len(), 4, "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("needs `model:`")));
        assert!(msgs.iter().any(|m| m.contains("PREFPIPE_TEST_SURELY_UNSET_KEY") && m.contains("not set")));
        assert_eq!(split_urls("http://a/v1, http://b/v1 http://c/v1").len(), 3);
    }
}

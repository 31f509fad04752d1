//! Where a request goes: the endpoint path (part of the cache key) and the
//! base URLs in rotation, each with its own in-flight limit.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use prefpipe_core::remote::redact_url;
use tokio::sync::Semaphore;

/// An endpoint path relative to a base URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Appended to `base_url`: `V1("chat/completions")` →
    /// `http://h:p/v1/chat/completions`.
    V1(&'static str),
    /// Appended to `base_url` minus a trailing `/v1` (vLLM's `/classify`,
    /// SGLang's `/generate`): `Root("classify")` → `http://h:p/classify`.
    Root(&'static str),
}

impl Endpoint {
    /// The path as the cache key sees it, independent of the base URL:
    /// `/v1/chat/completions`, `/classify`.
    pub fn path(&self) -> String {
        match self {
            Endpoint::V1(p) => format!("/v1/{}", p.trim_start_matches('/')),
            Endpoint::Root(p) => format!("/{}", p.trim_start_matches('/')),
        }
    }

    /// The full URL under `base` (a base URL without a trailing `/`).
    pub fn url(&self, base: &str) -> String {
        let base = base.trim_end_matches('/');
        match self {
            Endpoint::V1(p) => format!("{base}/{}", p.trim_start_matches('/')),
            Endpoint::Root(p) => format!("{}/{}", base.strip_suffix("/v1").unwrap_or(base), p.trim_start_matches('/')),
        }
    }
}

/// Consecutive connection errors / 5xx after which a base URL leaves the
/// rotation (while another one is still live).
pub(crate) const MAX_CONSECUTIVE_FAILURES: u32 = 5;

/// One base URL: its in-flight limit and health.
pub(crate) struct Ep {
    pub url: String,
    pub redacted: String,
    /// At most `max_concurrency` requests in flight; FIFO, so calls share it fairly.
    pub slots: Arc<Semaphore>,
    failures: AtomicU32,
    live: AtomicBool,
}

impl Ep {
    pub fn new(url: &str, max_concurrency: usize) -> Ep {
        Ep {
            url: url.trim_end_matches('/').to_string(),
            redacted: redact_url(url.trim_end_matches('/')),
            slots: Arc::new(Semaphore::new(max_concurrency.clamp(1, Semaphore::MAX_PERMITS))),
            failures: AtomicU32::new(0),
            live: AtomicBool::new(true),
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Takes the endpoint out of rotation; true the first time (log once).
    pub fn retire(&self) -> bool {
        self.live.swap(false, Ordering::SeqCst)
    }

    /// Back in rotation (it answered at start after all).
    pub fn revive(&self) {
        self.failures.store(0, Ordering::SeqCst);
        self.live.store(true, Ordering::SeqCst);
    }

    pub fn ok(&self) {
        self.failures.store(0, Ordering::SeqCst);
    }

    /// Records a connection error or 5xx; returns the consecutive count.
    pub fn fail(&self) -> u32 {
        self.failures.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// The base URLs of one client.
pub(crate) struct Rotation {
    pub eps: Vec<Ep>,
}

impl Rotation {
    /// `route % live` over the live endpoints, in configured order (stable
    /// while all are live); `None` when none is left.
    pub fn pick(&self, route: u64) -> Option<&Ep> {
        let live = self.eps.iter().filter(|e| e.is_live()).count();
        if live == 0 {
            return None;
        }
        let i = (route % live as u64) as usize;
        self.eps.iter().filter(|e| e.is_live()).nth(i)
    }

    /// Counts a failure of `ep`; after [`MAX_CONSECUTIVE_FAILURES`] it
    /// leaves the rotation unless it is the last one live (then retries and
    /// `max_retries` decide).
    pub fn failed(&self, ep: &Ep, why: &str) {
        if ep.fail() < MAX_CONSECUTIVE_FAILURES || !ep.is_live() {
            return;
        }
        let others = self.eps.iter().filter(|e| e.is_live() && !std::ptr::eq(*e, ep)).count();
        if others > 0 && ep.retire() {
            eprintln!(
                "prefpipe-remote: {} failed {MAX_CONSECUTIVE_FAILURES} times in a row ({why}); taking it out of rotation",
                ep.redacted
            );
        }
    }

    pub fn redacted(&self) -> Vec<String> {
        self.eps.iter().map(|e| e.redacted.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        let b = "http://h:8000/v1";
        assert_eq!(Endpoint::V1("chat/completions").url(b), "http://h:8000/v1/chat/completions");
        assert_eq!(Endpoint::Root("classify").url(b), "http://h:8000/classify");
        assert_eq!(Endpoint::Root("generate").url("http://h:30000"), "http://h:30000/generate");
        assert_eq!(Endpoint::V1("completions").path(), "/v1/completions");
        assert_eq!(Endpoint::Root("classify").path(), "/classify");
    }

    #[test]
    fn routing_is_modulo_live() {
        let r = Rotation { eps: vec![Ep::new("http://a/v1", 1), Ep::new("http://b/v1", 1), Ep::new("http://c/v1", 1)] };
        // 7 % 3 = 1 → b.
        assert_eq!(r.pick(7).unwrap().url, "http://b/v1");
        for _ in 0..MAX_CONSECUTIVE_FAILURES {
            r.failed(&r.eps[1], "503");
        }
        assert!(!r.eps[1].is_live());
        // Live are [a, c]: 7 % 2 = 1 → c.
        assert_eq!(r.pick(7).unwrap().url, "http://c/v1");
        for _ in 0..MAX_CONSECUTIVE_FAILURES {
            r.failed(&r.eps[0], "503");
        }
        // The last live endpoint never leaves: retries decide.
        for _ in 0..2 * MAX_CONSECUTIVE_FAILURES {
            r.failed(&r.eps[2], "503");
        }
        assert_eq!(r.pick(0).unwrap().url, "http://c/v1");
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(Ep::new("http://u:pw@h:1/v1/", 2).redacted, "http://h:1/v1");
    }
}

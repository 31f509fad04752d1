//! Exponential backoff with full jitter (AWS Architecture Blog, "Exponential
//! Backoff And Jitter", 2015): attempt `k` (0-based) sleeps a uniform draw in
//! `[0, min(cap, base·2^k)]`; a `Retry-After` from the server wins, up to 60 s.

use std::time::Duration;

use rand::Rng;

/// `Retry-After` is honoured up to this (DESIGN §11: 60 s cap).
pub(crate) const RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// 0.5 s base, 60 s cap, or `PREFPIPE_BACKOFF_BASE_MS` /
    /// `PREFPIPE_BACKOFF_CAP_MS` (milliseconds) where set.
    pub fn from_env() -> Backoff {
        let ms = |var: &str, default: u64| std::env::var(var).ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(default);
        Backoff {
            base: Duration::from_millis(ms("PREFPIPE_BACKOFF_BASE_MS", 500)),
            cap: Duration::from_millis(ms("PREFPIPE_BACKOFF_CAP_MS", 60_000)),
        }
    }

    /// The ceiling of attempt `attempt`'s draw: `min(cap, base·2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// How long to wait before retry number `attempt + 1`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(RETRY_AFTER_CAP);
        }
        let ceil = self.ceiling(attempt);
        if ceil.is_zero() {
            return ceil;
        }
        Duration::from_secs_f64(rand::rng().random_range(0.0..=ceil.as_secs_f64()))
    }
}

/// A `Retry-After` in delta-seconds (fractions accepted); an HTTP-date is
/// ignored (the backoff applies instead).
pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    let s: f64 = v.trim().parse().ok()?;
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(RETRY_AFTER_CAP.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_to_the_cap() {
        let b = Backoff { base: Duration::from_millis(500), cap: Duration::from_secs(60) };
        // 0.5 s · 2^k: 0.5, 1, 2, …; 0.5 · 2^7 = 64 > 60 → capped.
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
        assert_eq!(b.ceiling(3), Duration::from_secs(4));
        assert_eq!(b.ceiling(7), Duration::from_secs(60));
        assert_eq!(b.ceiling(400), Duration::from_secs(60));
        for k in 0..10 {
            assert!(b.delay(k, None) <= b.ceiling(k));
        }
    }

    #[test]
    fn retry_after_wins_up_to_60s() {
        let b = Backoff { base: Duration::from_millis(1), cap: Duration::from_millis(1) };
        assert_eq!(b.delay(0, parse_retry_after("3")), Duration::from_secs(3));
        assert_eq!(b.delay(0, parse_retry_after("3600")), Duration::from_secs(60));
        assert_eq!(parse_retry_after(" 0.25 "), Some(Duration::from_millis(250)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}

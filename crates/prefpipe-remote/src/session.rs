//! One stage run's use of a remote model: the request cache of the stage and
//! its counters. `send` is called by chunk threads concurrently; each call
//! replays what the cache holds, sends the rest (sharing the client's
//! in-flight limits), stores each answer before it is returned, and folds the
//! chunk's log into Parquet once every request has an outcome.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;

use crate::cache::{canonical_json, request_key, Cache, Key, LogWriter};
use crate::classify::QUOTE;
use crate::client::{Answer, Client};
use crate::{excerpt, runtime, Error, Identity, Outcome, Request, Stats, Validate};

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    from_cache: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// The request cache and counters of one stage run (`Sync`).
pub struct Session {
    client: Arc<Client>,
    identity: Identity,
    cache: Cache,
    /// The stage key's first 16 hex digits: the prefix of its log names.
    key16: String,
    max_failed_rows: u64,
    counters: Counters,
    /// Log names with a `send` in progress.
    busy: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("client", &self.client).field("dir", &self.cache.dir()).field("stats", &self.stats()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Releases a log name when its `send` ends, however it ends.
struct Claim<'a>(&'a Mutex<HashSet<String>>, String);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A stage key as a 16-hex-digit prefix (hashed when it is not hex).
fn key16(stage_key: &str) -> String {
    let hex = stage_key.len() >= 16 && stage_key.bytes().take(16).all(|b| b.is_ascii_hexdigit());
    if hex {
        stage_key[..16].to_ascii_lowercase()
    } else {
        blake3::hash(stage_key.as_bytes()).to_hex()[..16].to_string()
    }
}

impl Session {
    pub(crate) fn open(
        client: Arc<Client>,
        identity: Identity,
        store_root: &Path,
        stage_id: &str,
        stage_key: &str,
        max_failed_rows: u64,
    ) -> Result<Session, Error> {
        if stage_id.is_empty() || stage_id == "." || stage_id == ".." || stage_id.contains(['/', '\\', '\0']) {
            return Err(Error::rt(format!("`{stage_id}` cannot name a request-cache directory")));
        }
        let cache = Cache::open(&store_root.join("requests").join(stage_id))?;
        Ok(Session {
            client,
            identity,
            cache,
            key16: key16(stage_key),
            max_failed_rows,
            counters: Counters::default(),
            busy: Mutex::new(HashSet::new()),
        })
    }

    /// The served identity the cache keys use.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            sent: get(&c.sent),
            from_cache: get(&c.from_cache),
            retried: get(&c.retried),
            failed: get(&c.failed),
            dropped: get(&c.dropped),
        }
    }

    /// Sends `reqs` for chunk `chunk` of the stage (`tag`, `[A-Za-z0-9_-]`,
    /// tells apart several request streams of one chunk), or replays each from
    /// the cache. Blocks until every request has an outcome; outcomes are in
    /// request order. `validate` checks a 2xx body before it is cached; a
    /// failure fails the call naming the endpoint, the request and the body.
    /// `progress(done, total)` follows each outcome. Identical requests in one
    /// call are sent once. When all are done the chunk's log is folded into
    /// Parquet.
    pub fn send(
        &self,
        chunk: usize,
        tag: &str,
        reqs: Vec<Request>,
        validate: Validate,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Vec<Outcome>, Error> {
        if !is_name(tag) {
            return Err(Error::rt(format!("request tag `{tag}` must be 1-128 characters of [A-Za-z0-9_-]")));
        }
        let name = format!("{}-{chunk:06}-{tag}", self.key16);
        if !lock(&self.busy).insert(name.clone()) {
            return Err(Error::rt(format!("chunk {chunk} (`{tag}`) is already being sent")));
        }
        let _claim = Claim(&self.busy, name.clone());
        let total = reqs.len() as u64;
        let mut done = 0u64;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; reqs.len()];

        // Keys; a request identical to an earlier one of this call takes its outcome.
        let bodies: Vec<Vec<u8>> = reqs.iter().map(|r| canonical_json(&r.body)).collect();
        let keys: Vec<Key> = reqs.iter().zip(&bodies).map(|(r, b)| request_key(&r.endpoint.path(), &self.identity, b)).collect();
        let mut first: HashMap<Key, usize> = HashMap::new();
        let mut copies: Vec<(usize, usize)> = Vec::new();
        let mut pending: Vec<usize> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if let Some(&j) = first.get(k) {
                copies.push((i, j));
                continue;
            }
            first.insert(*k, i);
            match self.replay(&keys[i], validate)? {
                Some(v) => {
                    outcomes[i] = Some(Outcome::Ok(v));
                    self.counters.from_cache.fetch_add(1, Ordering::Relaxed);
                    done += 1;
                    progress(done, total);
                }
                None => pending.push(i),
            }
        }

        let log: Mutex<Option<LogWriter>> = Mutex::new(None);
        if !pending.is_empty() {
            let ctx = Call { session: self, name: &name, chunk, tag, validate, log: &log };
            runtime::block_on(async {
                let mut running: FuturesUnordered<_> = pending.iter().map(|&i| ctx.one(i, &reqs[i], &bodies[i], &keys[i])).collect();
                while let Some((i, res)) = running.next().await {
                    outcomes[i] = Some(res?);
                    done += 1;
                    progress(done, total);
                }
                Ok::<(), Error>(())
            })??;
        }
        drop(log);
        self.cache.fold(&name)?;

        for (i, j) in copies {
            outcomes[i] = outcomes[j].clone();
            self.counters.from_cache.fetch_add(1, Ordering::Relaxed);
            done += 1;
            progress(done, total);
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Dropped { reason: "request_failed", message: "no outcome".into() })).collect())
    }

    /// A cached body that parses and passes `validate`; anything else is a
    /// miss (the request is sent again).
    fn replay(&self, key: &Key, validate: Validate) -> Result<Option<Value>, Error> {
        let Some(bytes) = self.cache.get(key)? else { return Ok(None) };
        Ok(serde_json::from_slice::<Value>(&bytes).ok().filter(|v| validate(v).is_ok()))
    }
}

/// What one `send` call's requests share.
struct Call<'a> {
    session: &'a Session,
    name: &'a str,
    chunk: usize,
    tag: &'a str,
    validate: Validate<'a>,
    log: &'a Mutex<Option<LogWriter>>,
}

impl Call<'_> {
    async fn one(&self, i: usize, req: &Request, body: &[u8], key: &Key) -> (usize, Result<Outcome, Error>) {
        (i, self.outcome(i, req, body, key).await)
    }

    fn which(&self, i: usize) -> String {
        format!("request {i} of chunk {} (`{}`)", self.chunk, self.tag)
    }

    async fn outcome(&self, i: usize, req: &Request, body: &[u8], key: &Key) -> Result<Outcome, Error> {
        let s = self.session;
        let c = &s.counters;
        match s.client.execute(req.endpoint, req.route, body, &c.retried).await? {
            Answer::Body { bytes, url } => {
                c.sent.fetch_add(1, Ordering::Relaxed);
                let malformed = |why: String| {
                    let body = excerpt(&String::from_utf8_lossy(&bytes), QUOTE);
                    Error::rt(s.client.scrub(format!("malformed answer from POST {url} to {}: {why}; body: {body}", self.which(i))))
                };
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| malformed(format!("not JSON ({e})")))?;
                (self.validate)(&v).map_err(malformed)?;
                // Stored (and flushed) before it is used.
                let mut log = lock(self.log);
                if log.is_none() {
                    *log = Some(s.cache.open_log(self.name)?);
                }
                if let Some(w) = log.as_mut() {
                    s.cache.append(w, key, &bytes)?;
                }
                Ok(Outcome::Ok(v))
            }
            Answer::TooLong(message) => {
                c.sent.fetch_add(1, Ordering::Relaxed);
                c.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Dropped { reason: "prompt_too_long", message })
            }
            Answer::Rejected(message) => {
                c.sent.fetch_add(1, Ordering::Relaxed);
                if s.client.drops_rejected() {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    Ok(Outcome::Dropped { reason: "request_rejected", message })
                } else {
                    Err(Error::rt(format!("{message} ({}; `on_request_error: drop` drops such rows)", self.which(i))))
                }
            }
            Answer::Exhausted(message) => {
                let failed = c.failed.fetch_add(1, Ordering::Relaxed) + 1;
                if failed <= s.max_failed_rows {
                    Ok(Outcome::Dropped { reason: "request_failed", message })
                } else {
                    Err(Error::rt(format!(
                        "{message} ({}, after {} retries; {failed} failed requests > max_failed_rows {})",
                        self.which(i),
                        s.client.max_retries(),
                        s.max_failed_rows
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_keys_and_tags() {
        assert_eq!(key16("0123456789ABCDEF0123"), "0123456789abcdef");
        // Not hex: the first 16 hex digits of its blake3.
        assert_eq!(key16("score"), blake3::hash(b"score").to_hex()[..16].to_string());
        assert!(is_name("rm_0-a"));
        assert!(!is_name("a/b"));
        assert!(!is_name(""));
    }
}

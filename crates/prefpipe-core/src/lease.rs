//! One writer per shard (DESIGN §13).
//!
//! - **Local store:** file locks. A run of the whole store holds `LOCK`
//!   exclusively; a shard run holds `LOCK` shared and `locks/shard-I-of-N`
//!   exclusively. So shards run side by side, the same shard twice does not,
//!   and a run without `--shard` waits for every shard (and they for it). The
//!   holder writes who it is into the file it holds exclusively.
//! - **Object store:** a lease object, `leases/shard-I-of-N.json` or
//!   `leases/all.json`, written with create-if-absent (`PutMode::Create`),
//!   valid for `PREFPIPE_LEASE_TTL_S` (default 60) seconds and renewed every
//!   TTL/4 by a background thread with compare-and-swap (`PutMode::Update`).
//!   A lease past its expiry — or one whose holder process is gone from this
//!   same host — is taken over (compare-and-swap again, so two contenders
//!   cannot both win). A whole-store run is refused while any shard's lease
//!   is live, and a shard while the whole-store lease is. Dropping the guard
//!   stops renewal and deletes the lease.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fs4::fs_std::FileExt;
use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::objstore::{Put, Remote};
use crate::shard::Shard;

/// The default lease lifetime.
pub const DEFAULT_TTL_S: f64 = 60.0;

/// Holds a store for one writer; released on drop.
pub enum Guard {
    Local(Vec<File>),
    Lease(Lease),
}

impl Guard {
    /// Fails once an object-store lease was lost (taken over after it
    /// expired); a run must then stop writing.
    pub fn check(&self) -> Result<()> {
        match self {
            Guard::Local(_) => Ok(()),
            Guard::Lease(l) => l.check(),
        }
    }
}

fn who(shard: Option<Shard>) -> String {
    match shard {
        Some(s) => format!("shard {s}"),
        None => "a run of the whole store".to_string(),
    }
}

/// This machine's host name.
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".to_string())
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `2026-12-02T16:10:42Z`.
fn utc(t: f64) -> String {
    let secs = t.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn holder_line(shard: Option<Shard>) -> String {
    format!("{}, pid {} on {}, since {}", who(shard), std::process::id(), host(), utc(now_s()))
}

fn locked(store: &str, holder: String) -> Error {
    Error::Locked { store: store.to_string(), holder }
}

// ---- local file locks ----

fn try_lock(f: &File, exclusive: bool) -> std::io::Result<bool> {
    let r = if exclusive { FileExt::try_lock_exclusive(f) } else { FileExt::try_lock_shared(f) };
    match r {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

fn open_lock(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path).map_err(|e| Error::io(path, e))
}

fn read_holder(f: &mut File) -> String {
    let mut s = String::new();
    let _ = f.rewind().and_then(|_| f.read_to_string(&mut s));
    let s = s.trim();
    if s.is_empty() {
        "another prefpipe run".to_string()
    } else {
        s.to_string()
    }
}

fn write_holder(f: &mut File, line: &str) {
    // Best effort: the lock is what excludes; the text only names the holder.
    let _ = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| f.write_all(line.as_bytes())).and_then(|_| f.flush());
}

/// Takes the local locks of a run (`root` exists).
pub fn lock_local(root: &Path, shard: Option<Shard>) -> Result<Guard> {
    let shown = root.display().to_string();
    let lock_path = root.join("LOCK");
    let mut lock = open_lock(&lock_path)?;
    match shard {
        None => {
            if try_lock(&lock, true).map_err(|e| Error::io(&lock_path, e))? {
                write_holder(&mut lock, &holder_line(None));
                return Ok(Guard::Local(vec![lock]));
            }
            // Held shared by shards, or exclusively by another whole-store run.
            Err(locked(&shown, live_local_shard(root).unwrap_or_else(|| read_holder(&mut lock))))
        }
        Some(s) => {
            if !try_lock(&lock, false).map_err(|e| Error::io(&lock_path, e))? {
                return Err(locked(&shown, read_holder(&mut lock)));
            }
            let dir = root.join("locks");
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let path = dir.join(s.tag());
            let mut f = open_lock(&path)?;
            if !try_lock(&f, true).map_err(|e| Error::io(&path, e))? {
                return Err(locked(&shown, read_holder(&mut f)));
            }
            write_holder(&mut f, &holder_line(Some(s)));
            Ok(Guard::Local(vec![lock, f]))
        }
    }
}

/// The holder of a shard lock that is held right now, if any.
fn live_local_shard(root: &Path) -> Option<String> {
    let mut names: Vec<_> = std::fs::read_dir(root.join("locks")).ok()?.flatten().map(|e| e.path()).collect();
    names.sort();
    for p in names {
        let Ok(mut f) = OpenOptions::new().read(true).write(true).open(&p) else { continue };
        if let Ok(false) = try_lock(&f, true) {
            return Some(read_holder(&mut f));
        }
    }
    None
}

// ---- object-store leases ----

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseBody {
    holder: String,
    pid: u32,
    host: String,
    /// Distinguishes this run's lease from any other's.
    nonce: String,
    acquired_unix_s: f64,
    expires_unix_s: f64,
    ttl_s: f64,
}

impl LeaseBody {
    fn describe(&self) -> String {
        format!(
            "{}, pid {} on {}, since {}, lease valid until {}",
            self.holder,
            self.pid,
            self.host,
            utc(self.acquired_unix_s),
            utc(self.expires_unix_s)
        )
    }
    /// Still valid: not expired, and not held by a process known to be gone.
    fn live(&self, now: f64) -> bool {
        if self.expires_unix_s <= now {
            return false;
        }
        let same_host_dead = self.host == host() && cfg!(target_os = "linux") && !Path::new(&format!("/proc/{}", self.pid)).exists();
        !same_host_dead
    }
}

/// The lease TTL: `PREFPIPE_LEASE_TTL_S`, else 60 s.
pub fn ttl() -> Result<f64> {
    match std::env::var("PREFPIPE_LEASE_TTL_S") {
        Err(_) => Ok(DEFAULT_TTL_S),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(t) if t.is_finite() && t > 0.0 => Ok(t),
            _ => Err(Error::Input(format!("PREFPIPE_LEASE_TTL_S={v}: expected a positive number of seconds"))),
        },
    }
}

struct State {
    remote: Arc<Remote>,
    rel: String,
    ttl: f64,
    body: Mutex<(LeaseBody, UpdateVersion)>,
    stop: Mutex<bool>,
    wake: Condvar,
    lost: Mutex<Option<String>>,
}

/// A live lease on an object store, renewed until dropped.
pub struct Lease {
    state: Arc<State>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    fn check(&self) -> Result<()> {
        match &*self.state.lost.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(why) => Err(Error::Runtime(format!(
                "the lease {} was lost ({why}); another run may hold it now, so this one stops writing",
                self.state.remote.url_of(&self.state.rel)
            ))),
        }
    }
}

fn lease_rel(shard: Option<Shard>) -> String {
    format!("leases/{}.json", shard.map_or("all".to_string(), |s| s.tag()))
}

fn read_lease(remote: &Remote, rel: &str) -> Result<Option<(Option<LeaseBody>, UpdateVersion)>> {
    Ok(remote.get_versioned(rel)?.map(|(bytes, v)| (serde_json::from_slice(&bytes).ok(), v)))
}

/// Takes the lease of `shard` (or of the whole store), or says who holds it.
pub fn lease(remote: &Arc<Remote>, shard: Option<Shard>) -> Result<Guard> {
    let ttl = ttl()?;
    let rel = lease_rel(shard);
    let shown = remote.url.display();
    let nonce = {
        let mut h = blake3::Hasher::new();
        h.update(&std::process::id().to_le_bytes());
        h.update(&now_s().to_le_bytes());
        h.update(host().as_bytes());
        h.finalize().to_hex()[..16].to_string()
    };
    let fresh = || {
        let now = now_s();
        LeaseBody {
            holder: who(shard),
            pid: std::process::id(),
            host: host(),
            nonce: nonce.clone(),
            acquired_unix_s: now,
            expires_unix_s: now + ttl,
            ttl_s: ttl,
        }
    };
    let mut taken = None;
    for _ in 0..8 {
        let body = fresh();
        let bytes = serde_json::to_vec(&body).expect("lease serializes");
        match remote.put_mode(&rel, bytes.clone(), PutMode::Create)? {
            Put::Done(v) => {
                taken = Some((body, v));
                break;
            }
            Put::Changed => continue,
            Put::Exists => {}
        }
        let Some((other, version)) = read_lease(remote, &rel)? else { continue };
        if let Some(o) = other.as_ref().filter(|o| o.live(now_s())) {
            return Err(locked(&shown, o.describe()));
        }
        // Expired (or unreadable): take it over, only over the version we read.
        if let Put::Done(v) = remote.put_mode(&rel, bytes, PutMode::Update(version))? {
            taken = Some((body, v));
            break;
        }
    }
    let Some((body, version)) = taken else {
        return Err(locked(&shown, "other runs contending for the same lease".to_string()));
    };
    let state = Arc::new(State {
        remote: remote.clone(),
        rel: rel.clone(),
        ttl,
        body: Mutex::new((body, version)),
        stop: Mutex::new(false),
        wake: Condvar::new(),
        lost: Mutex::new(None),
    });
    let renewer = {
        let st = state.clone();
        std::thread::Builder::new()
            .name("prefpipe-lease".into())
            .spawn(move || renew(&st))
            .map_err(|e| Error::Runtime(format!("cannot start the lease renewal thread: {e}")))?
    };
    let guard = Lease { state, renewer: Some(renewer) };
    // Exclusion between shards and the whole store: written first, checked second,
    // so of two runs starting together at least one sees the other.
    let conflict = match shard {
        Some(_) => read_lease(remote, &lease_rel(None))?.and_then(|(b, _)| b).filter(|b| b.live(now_s())),
        None => {
            let mut found = None;
            for (name, _) in remote.list("leases")? {
                if !name.starts_with("shard-") {
                    continue;
                }
                if let Some((Some(b), _)) = read_lease(remote, &format!("leases/{name}"))? {
                    if b.live(now_s()) {
                        found = Some(b);
                        break;
                    }
                }
            }
            found
        }
    };
    if let Some(b) = conflict {
        drop(guard);
        return Err(locked(&shown, b.describe()));
    }
    Ok(Guard::Lease(guard))
}

/// Renews every TTL/4 until stopped; a lease found changed is lost.
fn renew(st: &State) {
    let every = Duration::from_secs_f64((st.ttl / 4.0).max(0.05));
    loop {
        {
            let stop = st.stop.lock().unwrap_or_else(|p| p.into_inner());
            let (stop, _) = st.wake.wait_timeout(stop, every).unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
        let (mut body, version) = st.body.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let expired_at = body.expires_unix_s;
        body.expires_unix_s = now_s() + st.ttl;
        let bytes = serde_json::to_vec(&body).expect("lease serializes");
        match st.remote.put_mode(&st.rel, bytes, PutMode::Update(version)) {
            Ok(Put::Done(v)) => *st.body.lock().unwrap_or_else(|p| p.into_inner()) = (body, v),
            Ok(_) => {
                *st.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some("it was taken over after it expired".into());
                return;
            }
            // A failed renewal is retried until the lease would have expired.
            Err(e) if now_s() >= expired_at => {
                *st.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("it could not be renewed: {e}"));
                return;
            }
            Err(_) => {}
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.state.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.state.wake.notify_all();
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if self.state.lost.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            let _ = self.state.remote.delete(&self.state.rel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_796_228_442.0), "2026-12-02T16:20:42Z");
        assert_eq!(utc(951_782_400.0), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn local_shards_share_and_exclude() {
        let dir = tempfile::tempdir().unwrap();
        let s = |i| Some(Shard { index: i, count: 3 });
        let a = lock_local(dir.path(), s(0)).unwrap();
        let _b = lock_local(dir.path(), s(1)).unwrap();
        let e = lock_local(dir.path(), s(0)).err().expect("the same shard twice");
        assert!(e.to_string().contains("locked by another prefpipe run: shard 0/3, pid "), "{e}");
        let e = lock_local(dir.path(), None).err().expect("the whole store while shards run");
        assert!(e.to_string().contains("shard "), "{e}");
        drop(a);
        drop(_b);
        let whole = lock_local(dir.path(), None).unwrap();
        let e = lock_local(dir.path(), s(2)).err().expect("a shard while the whole store is held");
        assert!(e.to_string().contains("a run of the whole store, pid "), "{e}");
        drop(whole);
    }
}

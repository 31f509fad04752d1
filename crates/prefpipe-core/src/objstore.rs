//! A run store on an object store (DESIGN §13), seen through a local mirror.
//!
//! Stages read and write local files as they always do; the store keeps its
//! layout (`stages/…`, `requests/…`, `run.json`) under the URL's prefix, and
//! a per-run directory on local disk mirrors what this run reads and writes:
//! a file is written there first and uploaded before its record, an input
//! chunk is downloaded (and checked against its recorded blake3) when a stage
//! needs it. The mirror is `$PREFPIPE_STAGING_DIR` (default: the system temp
//! directory) `/prefpipe-<hash of the URL>/<run tag>`; a clean run deletes it.
//!
//! Every call is blocking (a private tokio runtime; safe to call from inside
//! another runtime). [`mirror_of`] lets code that only sees a local path (the
//! request cache) find the store behind it.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::error::{Error, Result};
use crate::location::store_error;
pub use crate::location::{Cloud, ObjectUrl};
pub use object_store::ObjectStore;

/// Uploads and downloads in flight at once.
const PARALLEL: usize = 16;

/// What a conditional put did.
#[derive(Debug)]
pub enum Put {
    /// Written; the new version (for a later compare-and-swap).
    Done(UpdateVersion),
    /// `PutMode::Create` found an object there.
    Exists,
    /// `PutMode::Update` found another version there.
    Changed,
}

/// An object store behind a local mirror directory.
pub struct Remote {
    pub url: ObjectUrl,
    store: Arc<dyn ObjectStore>,
    /// Always `Some` until dropped (then shut down without blocking, so a
    /// clone dropped inside another runtime cannot panic).
    rt: Option<tokio::runtime::Runtime>,
    /// The mirror (the `Store`'s root).
    pub local: PathBuf,
    /// Objects known to exist in the store (paths relative to the prefix).
    known: Mutex<HashSet<String>>,
}

static MIRRORS: Mutex<Vec<(PathBuf, Weak<Remote>)>> = Mutex::new(Vec::new());

/// The store behind a local path inside a mirror, and the path's `/`-separated
/// name relative to the store's root.
pub fn mirror_of(path: &Path) -> Option<(Arc<Remote>, String)> {
    let mirrors = MIRRORS.lock().unwrap_or_else(|p| p.into_inner());
    for (root, weak) in mirrors.iter() {
        if let (Ok(rest), Some(r)) = (path.strip_prefix(root), weak.upgrade()) {
            return Some((r.clone(), rel_string(rest)));
        }
    }
    None
}

fn rel_string(p: &Path) -> String {
    p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

/// The default mirror directory of a store URL and run tag.
pub fn mirror_dir(url: &ObjectUrl, tag: &str) -> PathBuf {
    let base = std::env::var_os("PREFPIPE_STAGING_DIR").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let h = blake3::hash(url.display().as_bytes()).to_hex();
    base.join(format!("prefpipe-{}", &h[..16])).join(tag)
}

impl Remote {
    /// Builds the store from the environment, checks that the bucket answers
    /// (a missing bucket or refused credentials: exit 2) and registers the
    /// mirror `local`.
    pub fn connect(url: ObjectUrl, local: PathBuf) -> Result<Arc<Remote>> {
        let store = crate::location::build(&url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("prefpipe-store")
            .enable_all()
            .build()
            .map_err(|e| Error::Runtime(format!("cannot start the object-store runtime: {e}")))?;
        let r = Arc::new(Remote { url, store, rt: Some(rt), local: local.clone(), known: Mutex::new(HashSet::new()) });
        r.probe()?;
        std::fs::create_dir_all(&local).map_err(|e| Error::io(&local, e))?;
        let mut mirrors = MIRRORS.lock().unwrap_or_else(|p| p.into_inner());
        mirrors.retain(|(_, w)| w.strong_count() > 0);
        mirrors.push((local, Arc::downgrade(&r)));
        Ok(r)
    }

    /// One listing request: the bucket exists and the credentials work.
    fn probe(&self) -> Result<()> {
        let prefix = self.key("");
        let store = self.store.clone();
        self.block(async move { store.list_with_delimiter(Some(&prefix)).await })
            .map(|_| ())
            .map_err(|e| store_error(&self.url, "listing", &e))
    }

    /// The store, for DataFusion (`SessionContext::register_object_store`).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Runs `f` on the store's runtime, from any thread (a thread of its own
    /// when the caller is itself inside a runtime).
    fn block<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self.rt.as_ref().expect("the runtime lives as long as the store");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join().expect("object-store thread panicked"))
        } else {
            rt.block_on(f)
        }
    }

    fn key(&self, rel: &str) -> ObjectPath {
        let rel = rel.trim_matches('/');
        match (self.url.prefix.is_empty(), rel.is_empty()) {
            (true, _) => ObjectPath::from(rel),
            (false, true) => ObjectPath::from(self.url.prefix.as_str()),
            (false, false) => ObjectPath::from(format!("{}/{rel}", self.url.prefix)),
        }
    }

    /// The URL of a path inside the store (for messages and DataFusion).
    pub fn url_of(&self, rel: &str) -> String {
        self.url.url_of(rel)
    }

    /// The `/`-separated name of a file in the mirror.
    pub fn rel_of(&self, local: &Path) -> Result<String> {
        local.strip_prefix(&self.local).map(rel_string).map_err(|_| {
            Error::Runtime(format!("internal error: {} is outside the store's mirror {}", local.display(), self.local.display()))
        })
    }

    fn err(&self, rel: &str, what: &str, e: &object_store::Error) -> Error {
        store_error(&self.url, &format!("{what} {}", self.url_of(rel)), e)
    }

    /// Whether `rel` was listed, uploaded or downloaded by this run.
    pub fn known(&self, rel: &str) -> bool {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(rel)
    }

    fn learn(&self, rel: &str, exists: bool) {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if exists {
            k.insert(rel.to_string());
        } else {
            k.remove(rel);
        }
    }

    /// An object's bytes; `None` when there is none.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get_versioned(rel)?.map(|(b, _)| b))
    }

    /// An object's bytes and version (for [`Remote::put_mode`] with `Update`).
    pub fn get_versioned(&self, rel: &str) -> Result<Option<(Vec<u8>, UpdateVersion)>> {
        let key = self.key(rel);
        let store = self.store.clone();
        let res = self.block(async move {
            let g = store.get(&key).await?;
            let v = UpdateVersion { e_tag: g.meta.e_tag.clone(), version: g.meta.version.clone() };
            Ok::<_, object_store::Error>((g.bytes().await?.to_vec(), v))
        });
        match res {
            Ok(x) => {
                self.learn(rel, true);
                Ok(Some(x))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, "reading", &e)),
        }
    }

    /// Writes an object (overwriting).
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        match self.put_mode(rel, bytes, PutMode::Overwrite)? {
            Put::Done(_) => Ok(()),
            _ => Err(Error::Runtime(format!("internal error: an overwrite of {} was refused", self.url_of(rel)))),
        }
    }

    /// Writes an object with a precondition (`Create`: only if absent;
    /// `Update`: only over that version).
    pub fn put_mode(&self, rel: &str, bytes: Vec<u8>, mode: PutMode) -> Result<Put> {
        let key = self.key(rel);
        let store = self.store.clone();
        let opts = PutOptions { mode, ..Default::default() };
        let res = self.block(async move { store.put_opts(&key, PutPayload::from(bytes), opts).await });
        match res {
            Ok(r) => {
                self.learn(rel, true);
                Ok(Put::Done(UpdateVersion { e_tag: r.e_tag, version: r.version }))
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::Exists),
            Err(object_store::Error::Precondition { .. }) => Ok(Put::Changed),
            Err(e) => Err(self.err(rel, "writing", &e)),
        }
    }

    /// Deletes an object; one that is not there is fine.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        let store = self.store.clone();
        match self.block(async move { store.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                self.learn(rel, false);
                Ok(())
            }
            Err(e) => Err(self.err(rel, "deleting", &e)),
        }
    }

    /// Every object under `dir` (recursively): names relative to `dir` and sizes.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let key = self.key(dir);
        let store = self.store.clone();
        let metas =
            self.block(async move { store.list(Some(&key)).try_collect::<Vec<_>>().await }).map_err(|e| self.err(dir, "listing", &e))?;
        let base = self.key(dir);
        let mut out = Vec::new();
        for m in metas {
            let Some(parts) = m.location.prefix_match(&base) else { continue };
            let name = parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/");
            if name.is_empty() {
                continue;
            }
            let rel = if dir.trim_matches('/').is_empty() { name.clone() } else { format!("{}/{name}", dir.trim_matches('/')) };
            self.learn(&rel, true);
            out.push((name, m.size));
        }
        out.sort();
        Ok(out)
    }

    /// Deletes every object under `dir`.
    pub fn delete_dir(&self, dir: &str) -> Result<()> {
        let names = self.list(dir)?;
        let rels: Vec<String> = names.into_iter().map(|(n, _)| format!("{}/{n}", dir.trim_matches('/'))).collect();
        self.each(&rels, |r| self.delete(r))
    }

    /// Uploads files of the mirror (each to its own name), in parallel.
    pub fn upload(&self, files: &[PathBuf]) -> Result<()> {
        let jobs: Vec<(String, PathBuf)> = files.iter().map(|f| Ok((self.rel_of(f)?, f.clone()))).collect::<Result<_>>()?;
        let store = self.store.clone();
        let keys: Vec<(String, ObjectPath, PathBuf)> = jobs.into_iter().map(|(r, f)| (r.clone(), self.key(&r), f)).collect();
        let done: Vec<String> = self
            .block(async move {
                futures_util::stream::iter(keys)
                    .map(|(rel, key, file)| {
                        let store = store.clone();
                        async move {
                            let bytes = tokio::fs::read(&file).await.map_err(|e| (rel.clone(), Err(Error::io(&file, e))))?;
                            store.put(&key, PutPayload::from(bytes)).await.map_err(|e| (rel.clone(), Ok(e)))?;
                            Ok::<_, (String, std::result::Result<object_store::Error, Error>)>(rel)
                        }
                    })
                    .buffer_unordered(PARALLEL)
                    .try_collect()
                    .await
            })
            .map_err(|(rel, e)| match e {
                Ok(e) => self.err(&rel, "uploading", &e),
                Err(e) => e,
            })?;
        for rel in done {
            self.learn(&rel, true);
        }
        Ok(())
    }

    /// Downloads `rel` to `local` (atomically); false when there is no such object.
    pub fn download(&self, rel: &str, local: &Path) -> Result<bool> {
        let Some(bytes) = self.get(rel)? else { return Ok(false) };
        if let Some(dir) = local.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        crate::io::write_atomic(local, |f| {
            use std::io::Write;
            f.write_all(&bytes).map_err(|e| Error::io(local, e))
        })?;
        Ok(true)
    }

    /// Runs `f` over `items` with up to [`PARALLEL`] at once (blocking calls
    /// on scoped threads); the first error wins.
    pub fn each<T: Sync>(&self, items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let first: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..PARALLEL.min(items.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(item) {
                        first.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        break;
                    }
                });
            }
        });
        match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Fetches many objects' bytes at once (missing ones are `None`), in order.
    pub fn get_many(&self, rels: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let out: Vec<Mutex<Option<Vec<u8>>>> = rels.iter().map(|_| Mutex::new(None)).collect();
        let idx: Vec<usize> = (0..rels.len()).collect();
        self.each(&idx, |&i| {
            *out[i].lock().unwrap_or_else(|p| p.into_inner()) = self.get(&rels[i])?;
            Ok(())
        })?;
        Ok(out.into_iter().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).collect())
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        let mut mirrors = MIRRORS.lock().unwrap_or_else(|p| p.into_inner());
        mirrors.retain(|(_, w)| w.strong_count() > 0);
    }
}

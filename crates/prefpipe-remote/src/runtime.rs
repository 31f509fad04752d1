//! The one tokio runtime of the process that drives every remote request.
//! Stage threads are not async: they block on it (`Runtime::block_on` may be
//! called from many threads at once), so their futures run on the calling
//! thread while the runtime's workers drive the sockets.

use std::future::Future;
use std::sync::OnceLock;

use crate::Error;

static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// Runs `fut` to completion on the calling (non-async) thread.
pub(crate) fn block_on<F: Future>(fut: F) -> Result<F::Output, Error> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::rt("prefpipe-remote blocks its caller; it cannot be called from inside an async runtime"));
    }
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("prefpipe-remote")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the HTTP runtime: {e}"))
    });
    match rt {
        Ok(rt) => Ok(rt.block_on(fut)),
        Err(e) => Err(Error::rt(e.clone())),
    }
}

//! The `source` stage reading a .parquet file of arbitrary bytes: an input error, never a panic.
//!
//! parquet/arrow-ipc panic on some malformed footers; prefpipe catches those
//! (`prefpipe_core::io`'s guard) and reports bad input. libfuzzer-sys's panic
//! hook aborts on any panic, caught or not, so the hook is silenced here: a
//! panic prefpipe does not catch still aborts the process (unwinding out of
//! the fuzz callback) and counts as a crash.
#![no_main]
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: tempfile::TempDir = tempfile::tempdir().unwrap();
}

fuzz_target!(
    init: {
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| {
        DIR.with(|d| prefpipe_stages::fuzzing::source_bytes("parquet", data, d.path()));
    }
);

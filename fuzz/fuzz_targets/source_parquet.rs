//! The `source` stage reading a .parquet file of arbitrary bytes: an input error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: tempfile::TempDir = tempfile::tempdir().unwrap();
}

fuzz_target!(|data: &[u8]| {
    DIR.with(|d| prefpipe_stages::fuzzing::source_bytes("parquet", data, d.path()));
});

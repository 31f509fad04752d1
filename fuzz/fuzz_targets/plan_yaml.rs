//! Pipeline YAML → spec → plan (DESIGN §3): located errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: tempfile::TempDir = tempfile::tempdir().unwrap();
}

fuzz_target!(|data: &[u8]| {
    DIR.with(|d| prefpipe_stages::fuzzing::plan_yaml(data, d.path()));
});

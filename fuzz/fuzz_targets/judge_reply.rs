//! The judge-reply parsers (DESIGN §12) on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        prefpipe_stages::fuzzing::judge_reply(s);
    }
});

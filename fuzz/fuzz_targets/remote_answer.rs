//! The remote answer parsers (generate, classify, log-probs) on arbitrary
//! JSON; the first bytes choose how many token ids were sent.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let ids: Vec<u32> = (0..u32::from(n % 16)).collect();
    prefpipe_stages::fuzzing::remote_answer(rest, &ids);
});

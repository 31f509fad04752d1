//! Entry points for the `cargo fuzz` targets in `fuzz/` (not part of the
//! public API): each takes arbitrary bytes and must return, never panic.
//! A crash one of them finds becomes a regression test in this file.

use std::path::Path;

use prefpipe_core::remote::ServerKind;
use serde_json::Value;

/// Pipeline YAML → spec → plan, against an empty directory (no file a path
/// names exists, so planning stops at located errors).
pub fn plan_yaml(bytes: &[u8], base: &Path) {
    if let Ok(spec) = prefpipe_core::spec::parse("fuzz.yaml", bytes, "fuzz".into()) {
        let _ = prefpipe_core::plan::build(spec, base, crate::KINDS);
    }
}

/// The `source` stage's reader on a file of `ext` (`jsonl`, `csv`, `parquet`)
/// holding `bytes`, written into `dir`.
pub fn source_bytes(ext: &str, bytes: &[u8], dir: &Path) {
    let path = dir.join(format!("input.{ext}"));
    if std::fs::write(&path, bytes).is_err() {
        return;
    }
    let c: crate::source::SourceConfig =
        serde_json::from_value(serde_json::json!({ "path": path.display().to_string() })).expect("a minimal source config");
    let _ = crate::source::read_for_fuzz(&c, &path);
}

/// Every judge-reply parser (DESIGN §12) over `reply`, for 1…8 shown labels.
pub fn judge_reply(reply: &str) {
    for n in 1..=8 {
        if let Ok(r) = crate::judge::parse_ranking(reply, n) {
            assert_eq!(r.len(), n, "a parsed ranking ranks every shown label");
            assert!(r.iter().all(|&x| x >= 1 && x as usize <= n), "ranks lie in 1..=n: {r:?}");
        }
        let _ = crate::judge::parse_structured(reply, n);
    }
    let _ = crate::judge::pairwise::parse_verdict(reply);
    let _ = crate::judge::pairwise::parse_structured(reply);
}

/// The remote answer parsers (generate, classify, prompt log-probs of every
/// server kind) over `bytes` as JSON, with `ids` as the token ids sent.
pub fn remote_answer(bytes: &[u8], ids: &[u32]) {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else { return };
    use crate::backend::openai::{sample_of, scores_of, token_logprobs};
    let _ = sample_of(&v, true);
    let _ = sample_of(&v, false);
    let _ = scores_of(&v);
    for s in [ServerKind::Vllm, ServerKind::Sglang, ServerKind::Llamacpp, ServerKind::Openai] {
        if let Ok(lp) = token_logprobs(&v, s, ids) {
            assert_eq!(lp.len(), ids.len(), "one log-prob per id sent");
        }
    }
}

/// Crashes the fuzz targets found (inputs under `tests/fuzz-regressions/`).
#[cfg(test)]
mod regressions {
    use std::path::PathBuf;

    fn input(name: &str) -> Vec<u8> {
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions").join(name)).unwrap()
    }

    /// plan_yaml: an `export` whose `input: pairs` names no stage (the
    /// select was renamed `pabrs`) was planned with no inputs and indexed
    /// `inputs[0]` (export.rs). The plan must report the bad reference only.
    #[test]
    fn a_stage_whose_input_names_no_stage_is_not_planned() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = input("plan_yaml-input-names-no-stage.yaml");
        super::plan_yaml(&bytes, dir.path());
        let spec = prefpipe_core::spec::parse("p.yaml", &bytes, "p".into()).unwrap();
        let e = prefpipe_core::plan::build(spec, dir.path(), crate::KINDS).err().expect("a plan error").to_string();
        assert!(e.contains("`input` names no stage: `pairs`"), "{e}");
    }

    /// remote_answer: zero token ids sent made `token_logprobs` slice
    /// `lps[1..0]`. Now an error (a request always sends ≥ 1 id).
    #[test]
    fn log_probs_of_no_ids_are_an_error() {
        let bytes = input("remote_answer-no-ids.bin");
        assert_eq!(bytes[0] % 16, 0, "the first byte chose zero ids");
        super::remote_answer(&bytes[1..], &[]);
        let v: serde_json::Value = serde_json::from_slice(&bytes[1..]).unwrap();
        for s in [prefpipe_core::remote::ServerKind::Vllm, prefpipe_core::remote::ServerKind::Sglang] {
            assert!(crate::backend::openai::token_logprobs(&v, s, &[]).is_err());
        }
    }

    /// source_parquet: a footer whose embedded Arrow schema has no fields
    /// panicked inside arrow-ipc (`fb.fields().unwrap()`); now a bad-input error.
    #[test]
    /// (and a field of Arrow type NONE: "not implemented: Type NONE not supported").
    fn a_parquet_footer_that_panics_arrow_is_bad_input() {
        for name in ["source_parquet-schema-without-fields.parquet", "source_parquet-type-none.parquet"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("input.parquet");
            std::fs::write(&path, input(name)).unwrap();
            let c: crate::source::SourceConfig = serde_json::from_value(serde_json::json!({ "path": path.display().to_string() })).unwrap();
            match crate::source::read_for_fuzz(&c, &path) {
                Err(prefpipe_core::Error::Input(m)) => assert!(m.contains("not a readable Parquet file"), "{name}: {m}"),
                other => panic!("{name}: want an input error, got {other:?}"),
            }
        }
    }
}

//! The committed tiny models (data-samples/models/) against reference numbers
//! from Hugging Face transformers (tests/golden/models/*.json, written by
//! tests/reference/models_golden.py — the command line and versions are in
//! each file). Everything goes through the real loading path (`Model::load`).
//!
//! Re-bless the fixtures with `PREFPIPE_BLESS=1 cargo test -p prefpipe-models --test golden`,
//! then re-run the script to refresh the goldens.

use std::path::{Path, PathBuf};

use prefpipe_models::{ches, model_digest, write_fixture, write_reward_fixture, Device, Family, Model, SamplingParams};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn models_dir() -> PathBuf {
    repo().join("data-samples/models")
}

/// The committed fixtures: (directory, family, reward?, seed).
const FIXTURES: [(&str, Family, bool, u64); 5] = [
    ("tiny-llama", Family::Llama, false, 1),
    ("tiny-mistral", Family::Mistral, false, 2),
    ("tiny-qwen2", Family::Qwen2, false, 3),
    ("tiny-qwen3", Family::Qwen3, false, 4),
    ("tiny-llama-rm", Family::Llama, true, 5),
];

fn write(dir: &Path, family: Family, reward: bool, seed: u64) {
    if reward {
        write_reward_fixture(dir, family, seed).unwrap();
    } else {
        write_fixture(dir, family, seed).unwrap();
    }
}

/// `write_fixture` reproduces the committed files byte for byte (or rewrites them when blessing).
#[test]
fn committed_fixtures_are_reproducible() {
    let bless = std::env::var_os("PREFPIPE_BLESS").is_some();
    for (name, family, reward, seed) in FIXTURES {
        let committed = models_dir().join(name);
        if bless {
            write(&committed, family, reward, seed);
            continue;
        }
        let fresh = tempfile::tempdir().unwrap();
        write(fresh.path(), family, reward, seed);
        for entry in std::fs::read_dir(fresh.path()).unwrap() {
            let file = entry.unwrap().file_name();
            let a = std::fs::read(fresh.path().join(&file)).unwrap();
            let b = std::fs::read(committed.join(&file)).unwrap_or_default();
            assert!(a == b, "{name}/{}: differs from write_fixture output; re-bless with PREFPIPE_BLESS=1", file.to_string_lossy());
        }
    }
}

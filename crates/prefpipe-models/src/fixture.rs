//! Tiny random Hugging Face model directories for tests, examples and the
//! quickstart: `config.json` (transformers-4.x style), `model.safetensors`,
//! `tokenizer.json` (a real byte-level BPE that encodes any text),
//! `tokenizer_config.json` (special tokens + a chat template) and
//! `generation_config.json`. Weights come from ChaCha8 seeded with `seed`
//! (candle's own RNG cannot be seeded), so a seed always gives the same files.
//! transformers loads them with `AutoModelForCausalLM` /
//! `AutoModelForSequenceClassification` and `AutoTokenizer`.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::config::Family;
use crate::error::{Error, Result};

/// Sizes shared by every fixture.
const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTERMEDIATE: usize = 128;
const MAX_POSITIONS: usize = 512;
/// Tokenizer size: 3 special tokens + 256 byte symbols + 253 merges.
const TOKENIZER_VOCAB: usize = 512;
/// The version written into the files, as if saved by that transformers release.
const TRANSFORMERS_VERSION: &str = "4.46.0";

/// Qwen2's pre-tokenization regex (transformers `tokenization_qwen2.PRETOKENIZE_REGEX`).
const QWEN2_PRETOKENIZE_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Text the fixture tokenizer's merges are learned from (several scripts, so
/// multilingual prompts get some multi-byte merges too).
const CORPUS: &str = "\
The quick brown fox jumps over the lazy dog. A preference dataset pairs a prompt with a chosen and a rejected response.
Write a short poem about the sea. Explain why the sky is blue. What is the capital of France? The capital of France is Paris.
Reward models score each response; the best and the worst responses become a pair for direct preference optimization.
Please summarize the following text in one sentence. Give three reasons to learn a new language. How do I sort a list in Python?
Use the sorted function, or call list.sort() to sort in place. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14
Le renard brun rapide saute par-dessus le chien paresseux. Quelle est la capitale de la France ? C'est Paris.
Der schnelle braune Fuchs springt über den faulen Hund. Warum ist der Himmel blau? Schreiben Sie ein kurzes Gedicht.
El rápido zorro marrón salta sobre el perro perezoso. ¿Por qué el cielo es azul? Escribe un poema corto sobre el mar.
Быстрая коричневая лиса прыгает через ленивую собаку. Почему небо голубое? Напишите короткое стихотворение.
敏捷的棕色狐狸跳过了懒狗。为什么天空是蓝色的？请写一首关于大海的短诗。法国的首都是巴黎。
素早い茶色の狐がのろまな犬を飛び越える。空はなぜ青いのですか？海についての短い詩を書いてください。
def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i)\n
";

/// Which chat/tokenizer convention a fixture follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `<s>` BOS added by the post-processor, `</s>` EOS, `<pad>`; Zephyr-like template.
    Llama,
    /// No BOS; ChatML template with `<|im_start|>` / `<|im_end|>` (EOS), `<|endoftext|>` pad.
    ChatMl,
}

impl Style {
    fn of(family: Family) -> Self {
        match family {
            Family::Llama | Family::Mistral => Style::Llama,
            Family::Qwen2 | Family::Qwen3 => Style::ChatMl,
        }
    }

    /// Special tokens in id order 0, 1, 2.
    fn specials(self) -> [&'static str; 3] {
        match self {
            Style::Llama => ["<pad>", "<s>", "</s>"],
            Style::ChatMl => ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        }
    }

    fn chat_template(self) -> &'static str {
        match self {
            Style::Llama => concat!(
                "{{ bos_token }}{% for message in messages %}",
                "{% if message['role'] not in ['system', 'user', 'assistant'] %}",
                "{{ raise_exception('Conversation roles must be system, user or assistant') }}{% endif %}",
                "{{ '<|' + message['role'] + '|>\\n' + message['content'].strip() + eos_token + '\\n' }}",
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
            ),
            Style::ChatMl => concat!(
                "{% for message in messages %}",
                "{% if loop.first and message['role'] != 'system' %}",
                "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}",
                "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
            ),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// The fixture tokenizer as `tokenizer.json` text.
fn tokenizer_json(style: Style) -> Result<String> {
    let tok_err = |e: tokenizers::Error| Error::Tokenizer { what: "fixture tokenizer".into(), msg: e.to_string() };
    let specials = style.specials();
    let post: PostProcessorWrapper = match style {
        Style::Llama => TemplateProcessing::builder()
            .try_single("<s> $A")
            .and_then(|b| b.try_pair("<s> $A <s> $B"))
            .map_err(|e| Error::Tokenizer { what: "fixture tokenizer".into(), msg: e.to_string() })?
            .special_tokens(vec![("<s>", 1)])
            .build()
            .map_err(|e| Error::Tokenizer { what: "fixture tokenizer".into(), msg: e.to_string() })?
            .into(),
        Style::ChatMl => ByteLevel::new(false, false, false).into(),
    };
    // The ChatML style is Qwen2's pipeline exactly (transformers 5 rebuilds Qwen2
    // tokenizers from vocab + merges with it, ignoring tokenizer.json's).
    let (normalizer, pre_tokenizer): (Option<NormalizerWrapper>, PreTokenizerWrapper) = match style {
        Style::Llama => (None, ByteLevel::new(false, true, true).into()),
        Style::ChatMl => {
            let split = Split::new(SplitPattern::Regex(QWEN2_PRETOKENIZE_REGEX.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(tok_err)?;
            (
                Some(tokenizers::normalizers::unicode::NFC.into()),
                Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into(),
            )
        }
    };
    let mut tokenizer = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
        .with_model(BPE::default())
        .with_normalizer(normalizer)
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_post_processor(Some(post))
        .with_decoder(Some(ByteLevel::new(false, false, false).into()))
        .build()
        .map_err(tok_err)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(TOKENIZER_VOCAB)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tokenizer.train(&mut trainer, CORPUS.lines()).map_err(tok_err)?;
    let tokenizer: tokenizers::Tokenizer = tokenizer.into();
    tokenizer.to_string(true).map_err(tok_err)
}

/// Seeded N(0, std²) draws (Box–Muller over ChaCha8).
struct Normal(ChaCha8Rng);

impl Normal {
    fn sample(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = 1.0 - self.0.random::<f64>();
                let u2: f64 = self.0.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                mean + std * z as f32
            })
            .collect()
    }
}

/// (name, shape, mean, std) of every tensor, in checkpoint naming.
fn tensor_specs(family: Family, vocab: usize, reward: bool, tied: bool) -> Vec<(String, Vec<usize>, f32, f32)> {
    let mut t: Vec<(String, Vec<usize>, f32, f32)> = vec![];
    let w = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    // Embeddings/LM head wide enough that next-token distributions are peaked:
    // greedy decoding then has clear margins for the token-for-token goldens.
    t.push(("model.embed_tokens.weight".into(), vec![vocab, HIDDEN], 0.0, 0.5));
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN], 1.0, 0.1));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], 1.0, 0.1));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN], 0.0, w(HIDDEN)));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.0, w(HIDDEN)));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.0, w(HIDDEN)));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM], 0.0, w(HIDDEN)));
        if family == Family::Qwen2 {
            t.push((format!("{p}.self_attn.q_proj.bias"), vec![HEADS * HEAD_DIM], 0.0, 0.1));
            t.push((format!("{p}.self_attn.k_proj.bias"), vec![KV_HEADS * HEAD_DIM], 0.0, 0.1));
            t.push((format!("{p}.self_attn.v_proj.bias"), vec![KV_HEADS * HEAD_DIM], 0.0, 0.1));
        }
        if family == Family::Qwen3 {
            t.push((format!("{p}.self_attn.q_norm.weight"), vec![HEAD_DIM], 1.0, 0.1));
            t.push((format!("{p}.self_attn.k_norm.weight"), vec![HEAD_DIM], 1.0, 0.1));
        }
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![INTERMEDIATE, HIDDEN], 0.0, w(HIDDEN)));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![INTERMEDIATE, HIDDEN], 0.0, w(HIDDEN)));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTERMEDIATE], 0.0, w(INTERMEDIATE)));
    }
    t.push(("model.norm.weight".into(), vec![HIDDEN], 1.0, 0.1));
    if reward {
        t.push(("score.weight".into(), vec![1, HIDDEN], 0.0, w(HIDDEN)));
    } else if !tied {
        t.push(("lm_head.weight".into(), vec![vocab, HIDDEN], 0.0, 0.5));
    }
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Writes `name → f32 tensor` to a safetensors file with `{"format": "pt"}` metadata.
pub(crate) fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
    let bytes: BTreeMap<&String, Vec<u8>> =
        tensors.iter().map(|(k, (_, v))| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = tensors
        .iter()
        .map(|(k, (shape, _))| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &bytes[k]).map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tokenizer { what: "safetensors".into(), msg: e.to_string() })?;
    let meta = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::tensor::serialize_to_file(views, meta, path)
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })?;
    // safetensors writes through a `tempfile` (mode 0600) and renames it:
    // give the file the mode every other file gets.
    set_default_permissions(path)
}

/// Gives `path` the permissions a newly created file gets in its directory
/// (0666 less the umask on Unix), read off a probe file: files renamed from
/// private temp files (0600) or copied (the source's mode) then look like
/// every other file prefpipe writes.
pub(crate) fn set_default_permissions(path: &Path) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let probe = path.with_file_name(format!(".{name}.mode-{}", std::process::id()));
    let perm = std::fs::File::create(&probe).and_then(|f| f.metadata()).map(|m| m.permissions()).map_err(io);
    let _ = std::fs::remove_file(&probe);
    std::fs::set_permissions(path, perm?).map_err(io)
}

/// Writes a tiny random causal LM (`*ForCausalLM`) of `family` into `dir`.
pub fn write_fixture(dir: &Path, family: Family, seed: u64) -> Result<()> {
    write(dir, family, seed, false)
}

/// Writes a tiny random reward model (`*ForSequenceClassification`, one label, a `score` head).
pub fn write_reward_fixture(dir: &Path, family: Family, seed: u64) -> Result<()> {
    write(dir, family, seed, true)
}

fn write(dir: &Path, family: Family, seed: u64, reward: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let style = Style::of(family);
    let specials = style.specials();
    // Qwen pads its embedding past the tokenizer (like the real 151936 vs 151665).
    let vocab = match style {
        Style::Llama => TOKENIZER_VOCAB,
        Style::ChatMl => TOKENIZER_VOCAB + 8,
    };
    let tied = matches!(family, Family::Qwen2 | Family::Qwen3);

    let mut rng = Normal(ChaCha8Rng::seed_from_u64(seed));
    let tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = tensor_specs(family, vocab, reward, tied)
        .into_iter()
        .map(|(name, shape, mean, std)| {
            let data = rng.sample(shape.iter().product(), mean, std);
            (name, (shape, data))
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;

    let (bos, eos, pad) = match style {
        Style::Llama => (Some(1u32), 2u32, 0u32),
        Style::ChatMl => (None, 2, 0),
    };
    let head = if reward { "ForSequenceClassification" } else { "ForCausalLM" };
    let mut config = json!({
        "architectures": [format!("{}{head}", family.class_prefix())],
        "model_type": family.model_type(),
        "attention_dropout": 0.0,
        "bos_token_id": bos.unwrap_or(0),
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": true,
        "vocab_size": vocab,
    });
    let extra = match family {
        Family::Llama => json!({
            "attention_bias": false, "mlp_bias": false, "head_dim": HEAD_DIM, "pretraining_tp": 1,
            "rope_theta": 500000.0,
            // original_max_position_embeddings 64 puts the fixture's frequencies in all three
            // llama3 regimes (kept, smoothed, divided by factor) within 512 positions.
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        }),
        // A 48-token window, so longer golden sequences exercise sliding-window attention.
        Family::Mistral => {
            json!({"head_dim": HEAD_DIM, "rope_theta": 10000.0, "sliding_window": 48})
        }
        Family::Qwen2 => {
            json!({"rope_theta": 1000000.0, "use_sliding_window": false, "sliding_window": null,
                                "max_window_layers": LAYERS, "rope_scaling": null})
        }
        Family::Qwen3 => {
            json!({"attention_bias": false, "head_dim": HEAD_DIM, "rope_theta": 1000000.0,
                                "use_sliding_window": false, "sliding_window": null,
                                "max_window_layers": LAYERS, "rope_scaling": null})
        }
    };
    let obj = config.as_object_mut().expect("json! object");
    obj.extend(extra.as_object().expect("json! object").clone());
    if reward {
        obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
        obj.insert("label2id".into(), json!({"LABEL_0": 0}));
        obj.insert("pad_token_id".into(), json!(pad));
    }
    write_json(&dir.join("config.json"), &config)?;

    let tok = tokenizer_json(style)?;
    std::fs::write(dir.join("tokenizer.json"), tok).map_err(io_err(&dir.join("tokenizer.json")))?;

    let added: serde_json::Map<String, Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                i.to_string(),
                json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": true}),
            )
        })
        .collect();
    let tok_cfg = json!({
        "added_tokens_decoder": added,
        "bos_token": bos.map(|i| specials[i as usize]),
        "chat_template": style.chat_template(),
        "clean_up_tokenization_spaces": false,
        "eos_token": specials[eos as usize],
        "model_max_length": MAX_POSITIONS,
        "pad_token": specials[pad as usize],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null,
    });
    write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;

    if !reward {
        // Qwen-style lists two stop ids, Llama-style one: both forms must parse.
        let eos_ids = match style {
            Style::Llama => json!(eos),
            Style::ChatMl => json!([eos, pad]),
        };
        let gen = json!({
            "_from_model_config": true,
            "bos_token_id": bos.unwrap_or(0),
            "eos_token_id": eos_ids,
            "pad_token_id": pad,
            "transformers_version": TRANSFORMERS_VERSION,
        });
        write_json(&dir.join("generation_config.json"), &gen)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The weights get the mode config.json gets (the umask's), not the 0600
    /// of the temp file safetensors renames into place.
    #[cfg(unix)]
    #[test]
    fn weights_get_the_umask_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), Family::Llama, 1).unwrap();
        let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        // (Under the usual umask 022: 0644, where safetensors' temp file is 0600.)
        assert_eq!(mode("model.safetensors"), mode("config.json"));
    }

    #[test]
    fn fixtures_are_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_fixture(a.path(), Family::Qwen2, 7).unwrap();
        write_fixture(b.path(), Family::Qwen2, 7).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            let x = std::fs::read(a.path().join(f)).unwrap();
            let y = std::fs::read(b.path().join(f)).unwrap();
            assert!(x == y, "{f} differs between two runs with the same seed");
        }
    }

    #[test]
    fn fixture_tokenizer_encodes_any_text() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), Family::Llama, 1).unwrap();
        let tok = crate::tokenizer::TextTokenizer::load(dir.path()).unwrap();
        assert_eq!(tok.vocab_size(), TOKENIZER_VOCAB);
        for text in ["hello world", "Grüße, 世界! 🦀", "\u{0}\t\n"] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
        assert_eq!(tok.encode("hi", true).unwrap()[0], 1, "<s> is prepended");
        assert_eq!(tok.eos_id(), Some(2));
    }
}

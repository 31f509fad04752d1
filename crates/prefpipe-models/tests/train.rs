//! The trainer on the committed tiny models: step losses against PyTorch
//! (tests/golden/train/golden.json, written by tests/reference/train_golden.py),
//! AdamW against `torch.optim.AdamW`, learning a synthetic preference,
//! LoRA, gradient accumulation and resuming from a checkpoint.

use std::path::{Path, PathBuf};

use prefpipe_models::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use prefpipe_models::train::{reference_logps, Example, LoraConfig, LrSchedule, Method, TrainOptions, Trainer};
use prefpipe_models::{Device, Model};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir(name: &str) -> PathBuf {
    repo().join("data-samples/models").join(name)
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("tests/golden/train/golden.json")).unwrap()).unwrap()
}

fn jsonl(name: &str) -> Vec<Value> {
    std::fs::read_to_string(repo().join("tests/golden/train").join(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

/// One example's (prompt ids, response ids) per DESIGN §4/§15 (train_golden.py
/// `encode_example`): each response through `pair_ids`; the prompt is the
/// shortest prompt part (TRL's k = the smallest common prefix), each response
/// the rest of its sequence. Without a chat template nothing moves.
fn encode_example(m: &Model, prompt: &str, responses: &[&str], chat: bool) -> (Vec<u32>, Vec<Vec<u32>>) {
    let enc: Vec<_> = responses.iter().map(|y| m.pair_ids(prefpipe_models::Prompt::Text(prompt), y, chat).unwrap()).collect();
    let k = enc.iter().map(|(p, _)| p.len()).min().unwrap();
    let prompt = enc[0].0[..k].to_vec();
    (prompt, enc.into_iter().map(|(p, r)| [&p[k..], r.as_slice()].concat()).collect())
}

/// The golden tables, tokenized by `m` per DESIGN §4/§15.
fn golden_examples(m: &Model, method: &str, chat: bool) -> Vec<Example> {
    let s = |v: &Value| v.as_str().unwrap().to_string();
    match method {
        "dpo" => jsonl("pairs.jsonl")
            .iter()
            .map(|r| {
                let (prompt, mut ys) = encode_example(m, &s(&r["prompt"]), &[&s(&r["chosen"]), &s(&r["rejected"])], chat);
                let rejected = ys.pop().unwrap();
                Example::pair(prompt, ys.pop().unwrap(), rejected)
            })
            .collect(),
        _ => jsonl("lists.jsonl")
            .iter()
            .map(|r| {
                let responses: Vec<String> = r["responses"].as_array().unwrap().iter().map(s).collect();
                let refs: Vec<&str> = responses.iter().map(String::as_str).collect();
                let (prompt, ys) = encode_example(m, &s(&r["prompt"]), &refs, chat);
                Example::list(prompt, ys, r["rewards"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
            })
            .collect(),
    }
}

/// Steps 1 and 2 of every golden case: the step-1 loss (before any update)
/// matches PyTorch to 1e-4 relative; step 2 (after one clipped AdamW step on
/// the step-1 loss, torch.optim.AdamW in the script) to 1e-3.
#[test]
fn step_losses_match_pytorch() {
    let g = golden();
    let step = &g["optimizer_step"];
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let method = case["method"].as_str().unwrap();
        let chat = case["chat_template"].as_bool().unwrap();
        let policy = Model::load_trainable(&model_dir(case["model"].as_str().unwrap()), &Device::Cpu).unwrap();
        let reference = Model::load(&model_dir(case["reference"].as_str().unwrap()), &Device::Cpu).unwrap();
        let examples = golden_examples(&policy, method, chat);
        let ref_logps = reference_logps(&reference, &examples).unwrap();
        // The reference log-probs themselves (transformers, one sequence at a time).
        for (ours, theirs) in
            ref_logps.iter().flatten().zip(case["reference_logps"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap()))
        {
            assert!(rel_close(*ours, theirs.as_f64().unwrap(), 1e-5), "{name}: reference log-prob {ours} vs {theirs}");
        }
        let opts = TrainOptions {
            method: if method == "dpo" { Method::Dpo } else { Method::Lipo },
            beta: case["beta"].as_f64().unwrap(),
            lr: step["lr"].as_f64().unwrap(),
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            shuffle: false,
            max_steps: Some(2),
            max_grad_norm: Some(step["max_grad_norm"].as_f64().unwrap()),
            adam: AdamWConfig { weight_decay: step["weight_decay"].as_f64().unwrap(), ..Default::default() },
            ..Default::default()
        };
        let mut t = Trainer::new(policy, examples, ref_logps, opts, None).unwrap();
        t.run(&|_, _| {}).unwrap();
        let m = t.metrics();
        let s1 = &case["step1"];
        for (got, key) in [
            (m[0].loss, "loss"),
            (m[0].reward_accuracy, "reward_accuracy"),
            (m[0].reward_margin, "reward_margin"),
            (m[0].chosen_logp, "chosen_logp"),
            (m[0].rejected_logp, "rejected_logp"),
        ] {
            let want = s1[key].as_f64().unwrap();
            assert!(rel_close(got, want, 1e-4), "{name} step 1 {key}: {got} vs PyTorch {want}");
        }
        let want = case["step2"]["loss"].as_f64().unwrap();
        assert!(rel_close(m[1].loss, want, 1e-3), "{name} step 2 loss: {} vs PyTorch {want}", m[1].loss);
    }
}

/// Three `torch.optim.AdamW` steps with weight decay, and `clip_grad_norm_`.
#[test]
fn adamw_matches_torch() {
    let g = &golden()["adamw"];
    let f32s = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<f32>>();
    let c = &g["config"];
    let p = candle_core::Var::from_slice(&f32s(&g["params"]), 5, &candle_core::Device::Cpu).unwrap();
    let cfg = AdamWConfig {
        beta1: c["betas"][0].as_f64().unwrap(),
        beta2: c["betas"][1].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
    };
    let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg);
    for (grad, want) in g["grads"].as_array().unwrap().iter().zip(g["after_each_step"].as_array().unwrap()) {
        opt.step(&[f32s(grad)], c["lr"].as_f64().unwrap()).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(f32s(want)) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{got:?} vs torch {want}");
        }
    }
    let state = opt.state().unwrap();
    for (key, name) in [("exp_avg", "exp_avg.p"), ("exp_avg_sq", "exp_avg_sq.p")] {
        let got = state[name].to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(f32s(&g[key])) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-6), "{key}: {got:?} vs torch {}", g[key]);
        }
    }
    let clip = &g["clip"];
    let mut grads: Vec<Vec<f32>> = clip["grads"].as_array().unwrap().iter().map(f32s).collect();
    let norm = clip_grad_norm(&mut grads, clip["max_norm"].as_f64().unwrap());
    assert!(rel_close(norm, clip["norm"].as_f64().unwrap(), 1e-6));
    for (a, b) in grads.iter().zip(clip["clipped"].as_array().unwrap()) {
        for (x, y) in a.iter().zip(f32s(b)) {
            assert!((x - y).abs() < 1e-6, "{grads:?} vs torch {}", clip["clipped"]);
        }
    }
}

/// A synthetic task with a learnable preference: every response is a
/// sentence of random words, and the chosen one ends with a polite sign-off
/// while the rejected one ends rudely (LiPO: four sign-offs, ranked).
const SIGN_OFFS: [&str; 4] = [" Thank you!", " Okay.", " Hmm.", " Go away!"];
const WORDS: [&str; 12] = ["sea", "blue", "river", "quick", "fox", "light", "stone", "green", "cloud", "paper", "music", "bread"];

fn synthetic(m: &Model, n: usize, seed: u64, list: bool) -> Vec<Example> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let mut words = |k: usize| (0..k).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ");
            let prompt = m.encode_prompt(&format!("Question {i}: tell me about {}.", words(2)), false).unwrap();
            let body = words(4);
            let resp = |s: &str| m.encode_response(&format!("The {body}.{s}")).unwrap();
            if list {
                Example::list(prompt, SIGN_OFFS.iter().map(|s| resp(s)).collect(), vec![3.0, 2.0, 1.0, 0.0])
            } else {
                Example::pair(prompt, resp(SIGN_OFFS[0]), resp(SIGN_OFFS[3]))
            }
        })
        .collect()
}

/// Implicit-reward accuracy on held-out examples: the share of labelled
/// pairs (better, worse) with sθ(better) − s_ref(better) > sθ(worse) − s_ref(worse); ties count ½.
fn heldout_accuracy(policy: &Model, reference: &Model, examples: &[Example]) -> f64 {
    let pol = reference_logps(policy, examples).unwrap();
    let refr = reference_logps(reference, examples).unwrap();
    let (mut correct, mut pairs) = (0.0, 0.0);
    for ((e, p), r) in examples.iter().zip(&pol).zip(&refr) {
        for i in 0..e.rewards.len() {
            for j in 0..e.rewards.len() {
                if e.rewards[i] > e.rewards[j] {
                    let d = (p[i] - r[i]) - (p[j] - r[j]);
                    correct += if d > 0.0 {
                        1.0
                    } else if d == 0.0 {
                        0.5
                    } else {
                        0.0
                    };
                    pairs += 1.0;
                }
            }
        }
    }
    correct / pairs
}

/// DPO and LiPO each take held-out implicit-reward accuracy from 0.5 (the
/// policy is the reference: every margin is 0) to ≥ 0.9, measured on the
/// checkpoint loaded back from disk through the real loading path.
#[test]
fn dpo_and_lipo_learn_a_synthetic_preference() {
    let dir = model_dir("tiny-llama");
    let reference = Model::load(&dir, &Device::Cpu).unwrap();
    for (method, list) in [(Method::Dpo, false), (Method::Lipo, true)] {
        let train = synthetic(&reference, 48, 1, list);
        let heldout = synthetic(&reference, 24, 2, list);
        assert_eq!(heldout_accuracy(&reference, &reference, &heldout), 0.5);
        let ref_logps = reference_logps(&reference, &train).unwrap();
        let opts = TrainOptions { method, beta: 0.1, lr: 1e-3, epochs: 2, batch_size: 8, seed: 3, ..Default::default() };
        let mut t = Trainer::new(Model::load_trainable(&dir, &Device::Cpu).unwrap(), train, ref_logps, opts, None).unwrap();
        t.run(&|_, _| {}).unwrap();
        assert_eq!(t.metrics().len(), 12);
        let out = tempfile::tempdir().unwrap();
        t.save_pretrained(out.path()).unwrap();
        let trained = Model::load(out.path(), &Device::Cpu).unwrap();
        let acc = heldout_accuracy(&trained, &reference, &heldout);
        assert!(acc >= 0.9, "{method:?}: held-out implicit-reward accuracy {acc}");
        let m = t.metrics();
        assert!(m.last().unwrap().loss < m[0].loss, "{method:?}: loss {} → {}", m[0].loss, m.last().unwrap().loss);
    }
}

fn bytes_of(m: &Model) -> std::collections::BTreeMap<String, Vec<f32>> {
    m.varmap()
        .unwrap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// LoRA trains only A and B (the base weights stay bit for bit), and the
/// merged checkpoint W + (alpha/r)·B·A gives the adapter model's log-probs.
#[test]
fn lora_trains_adapters_only_and_merges() {
    let dir = model_dir("tiny-qwen2");
    let reference = Model::load(&dir, &Device::Cpu).unwrap();
    let train = synthetic(&reference, 16, 5, false);
    let ref_logps = reference_logps(&reference, &train).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, targets: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()] };
    let opts = TrainOptions { lr: 1e-2, max_steps: Some(4), batch_size: 4, lora: Some(lora), ..Default::default() };
    let policy = Model::load_trainable(&dir, &Device::Cpu).unwrap();
    let base = bytes_of(&policy);
    let mut t = Trainer::new(policy, train.clone(), ref_logps, opts, None).unwrap();
    let init: Vec<Vec<f32>> = t.trainable().iter().map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    assert_eq!(t.trainable().len(), 2 * 3 * 2, "A and B for 3 modules × 2 layers");
    t.run(&|_, _| {}).unwrap();
    assert_eq!(bytes_of(t.model()), base, "base weights unchanged until merge");
    for ((name, v), before) in t.trainable().iter().zip(&init) {
        assert_ne!(&v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), before, "{name} trained");
    }
    // Merge and save; load back through Model::load.
    let out = tempfile::tempdir().unwrap();
    t.save_pretrained(out.path()).unwrap();
    let merged = Model::load(out.path(), &Device::Cpu).unwrap();
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = train.iter().flat_map(|e| e.sequences()).collect();
    let decoder = t.decoder().unwrap();
    let adapter: Vec<f64> = seqs
        .iter()
        .map(|(p, r)| {
            let b = prefpipe_models::decoder::PaddedBatch::right_padded(&[[p.as_slice(), r].concat()], 0, &Device::Cpu).unwrap();
            f64::from(decoder.sequence_logps(&b, &[(p.len(), r.len())]).unwrap().to_vec1::<f32>().unwrap()[0])
        })
        .collect();
    let from_disk = merged.logprobs(&seqs).unwrap();
    let base_lp = reference.logprobs(&seqs).unwrap();
    for ((a, m), b) in adapter.iter().zip(&from_disk).zip(&base_lp) {
        assert!((a - m).abs() <= 1e-4 * a.abs().max(1.0), "adapter {a} vs merged {m}");
        assert!((a - b).abs() > 1e-3, "training moved the log-probs ({a} vs base {b})");
    }
    // Only the targeted weights differ from the base checkpoint.
    let on_disk = candle_core::safetensors::load(out.path().join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    for (name, w) in &base {
        let d = on_disk[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let targeted = ["q_proj", "v_proj", "up_proj"].iter().any(|t| name.ends_with(&format!("{t}.weight")));
        assert_eq!(&d != w, targeted, "{name}");
    }
}

/// Accumulating 2 micro-batches of 2 is one batch of 4: the same losses and
/// (up to float summation order) the same weights.
#[test]
fn grad_accumulation_equals_a_bigger_batch() {
    let dir = model_dir("tiny-llama");
    let reference = Model::load(&dir, &Device::Cpu).unwrap();
    let train = synthetic(&reference, 12, 9, true);
    let ref_logps = reference_logps(&reference, &train).unwrap();
    let run = |batch_size, grad_accum| {
        let opts =
            TrainOptions { method: Method::Lipo, lr: 1e-3, batch_size, grad_accum, max_steps: Some(3), seed: 4, ..Default::default() };
        let mut t = Trainer::new(Model::load_trainable(&dir, &Device::Cpu).unwrap(), train.clone(), ref_logps.clone(), opts, None).unwrap();
        t.run(&|_, _| {}).unwrap();
        (t.metrics().to_vec(), bytes_of(t.model()))
    };
    let (m4, w4) = run(4, 1);
    let (m22, w22) = run(2, 2);
    for (a, b) in m4.iter().zip(&m22) {
        assert!(rel_close(a.loss, b.loss, 1e-5), "{} vs {}", a.loss, b.loss);
    }
    for (name, a) in &w4 {
        for (x, y) in a.iter().zip(&w22[name]) {
            assert!((x - y).abs() < 1e-4, "{name}: {x} vs {y}");
        }
    }
}

/// A run stopped after step 5 with checkpoints every 3 steps resumes from
/// step 3 and ends with bit-identical weights, optimizer state and metrics
/// losses to an uninterrupted run (shuffled, cosine schedule with warmup, LoRA).
#[test]
fn resume_gives_identical_weights() {
    let dir = model_dir("tiny-llama");
    let reference = Model::load(&dir, &Device::Cpu).unwrap();
    let train = synthetic(&reference, 20, 11, false);
    let ref_logps = reference_logps(&reference, &train).unwrap();
    for lora in [None, Some(LoraConfig { r: 2, alpha: 4.0, targets: vec!["q_proj".into(), "down_proj".into()] })] {
        let opts = TrainOptions {
            lr: 1e-3,
            batch_size: 3,
            epochs: 2,
            save_every: 3,
            warmup_ratio: 0.2,
            schedule: LrSchedule::Cosine,
            seed: 8,
            lora,
            ..Default::default()
        };
        let trainer = |ckpt: &Path| {
            Trainer::new(
                Model::load_trainable(&dir, &Device::Cpu).unwrap(),
                train.clone(),
                ref_logps.clone(),
                opts.clone(),
                Some(ckpt.to_path_buf()),
            )
            .unwrap()
        };
        let a = tempfile::tempdir().unwrap();
        let mut clean = trainer(a.path());
        assert_eq!(clean.total_steps(), 14);
        clean.run(&|_, _| {}).unwrap();

        let b = tempfile::tempdir().unwrap();
        let mut first = trainer(b.path());
        for _ in 0..5 {
            first.train_step().unwrap();
        }
        drop(first);
        let mut resumed = trainer(b.path());
        assert_eq!(resumed.step(), 3);
        assert_eq!(resumed.starts(), &[0, 3]);
        resumed.run(&|_, _| {}).unwrap();
        let vals = |t: &Trainer| t.trainable().iter().map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>();
        assert_eq!(vals(&clean), vals(&resumed));
        assert_eq!(bytes_of(clean.model()), bytes_of(resumed.model()));
        let losses = |t: &Trainer| t.metrics().iter().map(|m| (m.step, m.loss, m.lr)).collect::<Vec<_>>();
        assert_eq!(losses(&clean), losses(&resumed));
    }
}

/// Policy log-probs are summed in f64 on the host, in token order — as the
/// reference's are (`Model::logprobs`) — not in f32: on 2 × 450 tokens an f32
/// sum (|s| ≈ 2,800, f32 spacing 2.4e-4 there) is off by ~1e-4 nats, while
/// this is the f64 sum of the very token log-probs, bit for bit.
#[test]
fn policy_logps_are_summed_in_f64() {
    let dir = model_dir("tiny-llama");
    let policy = Model::load_trainable(&dir, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = vec![1, 40, 41, 42];
    let chosen: Vec<u32> = (0..450u32).map(|i| 3 + (i * 37) % 500).collect();
    let rejected: Vec<u32> = (0..440u32).map(|i| 3 + (i * 53 + 7) % 500).collect();
    let pad = policy.tokenizer().pad_id().or(policy.eos_id()).unwrap_or(0);
    let seqs = vec![[prompt.as_slice(), &chosen].concat(), [prompt.as_slice(), &rejected].concat()];
    let split = [(prompt.len(), chosen.len()), (prompt.len(), rejected.len())];
    let examples = vec![Example::pair(prompt, chosen, rejected)];
    let t = Trainer::new(policy, examples, vec![vec![-2800.0, -2700.0]], TrainOptions::default(), None).unwrap();
    let batch = prefpipe_models::decoder::PaddedBatch::right_padded(&seqs, pad, &Device::Cpu).unwrap();
    let tok = t.decoder().unwrap().response_token_logps(&batch, &split).unwrap().to_vec1::<f32>().unwrap();
    let want_c: f64 = tok[..450].iter().map(|&x| f64::from(x)).sum();
    let want_r: f64 = tok[450..].iter().map(|&x| f64::from(x)).sum();
    let stats = t.evaluate(&[0]).unwrap().stats;
    assert_eq!((stats.chosen_logp, stats.rejected_logp), (want_c, want_r));
}

/// A NaN gradient with a finite loss fails the step naming it, before AdamW
/// applies it (`f64::min` once turned the NaN clip coefficient into 1), and
/// no checkpoint is written. The model: embedding column 0 is 100 for every
/// token, so the final hidden state's component 0 is > 0 at every position,
/// and lm_head's row for a token the data never uses is −∞ there — that
/// logit is −∞ (softmax weight exactly 0, the loss finite) while backward
/// computes 0 · (−∞) = NaN into the hidden state and every weight before it.
#[test]
fn nan_gradients_fail_the_step_and_save_nothing() {
    let dir = model_dir("tiny-llama");
    let reference = Model::load(&dir, &Device::Cpu).unwrap();
    let train = synthetic(&reference, 4, 21, false);
    let ref_logps = reference_logps(&reference, &train).unwrap();
    let used: std::collections::BTreeSet<u32> = train.iter().flat_map(|e| e.sequences()).flat_map(|(p, r)| [p, r].concat()).collect();
    let unused = (0..512u32).rev().find(|t| !used.contains(t)).unwrap();
    let poisoned = || {
        let policy = Model::load_trainable(&dir, &Device::Cpu).unwrap();
        {
            let vars = policy.varmap().unwrap().data().lock().unwrap();
            let edit = |name: &str, f: &dyn Fn(&mut Vec<Vec<f32>>)| {
                let w = &vars[name];
                let mut rows = w.to_vec2::<f32>().unwrap();
                f(&mut rows);
                w.set(&candle_core::Tensor::new(rows, &candle_core::Device::Cpu).unwrap()).unwrap();
            };
            edit("model.embed_tokens.weight", &|rows| rows.iter_mut().for_each(|r| r[0] = 100.0));
            edit("lm_head.weight", &|rows| rows[unused as usize][0] = f32::NEG_INFINITY);
        }
        policy
    };
    let ckpt = tempfile::tempdir().unwrap();
    for max_grad_norm in [Some(1.0), None] {
        let opts = TrainOptions { lr: 1e-3, batch_size: 4, max_steps: Some(1), max_grad_norm, ..Default::default() };
        let policy = poisoned();
        let mut t = Trainer::new(policy, train.clone(), ref_logps.clone(), opts, Some(ckpt.path().to_path_buf())).unwrap();
        let e = t.train_step().unwrap_err();
        assert!(matches!(&e, prefpipe_models::Error::NonFinite { step: 1, what, .. } if what == "the gradient norm"), "{e}");
        assert!(!e.is_input(), "a run-time failure (exit 1), not bad input");
        assert!(e.to_string().contains("training step 1"), "{e}");
        assert!(std::fs::read_dir(ckpt.path()).unwrap().next().is_none(), "no checkpoint written");
    }
}

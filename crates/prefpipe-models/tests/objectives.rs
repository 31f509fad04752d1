//! The objectives beyond DPO-sigmoid and LiPO (DESIGN §8 "More objectives")
//! against TRL 1.16 itself (tests/golden/objectives/golden.json, written by
//! tests/reference/objectives_golden.py), and each one learning the synthetic
//! preference of crates/prefpipe-models/tests/train.rs.

use std::path::{Path, PathBuf};

use prefpipe_models::train::{reference_logps, AdamWConfig, DpoLoss, Example, Method, TrainOptions, Trainer};
use prefpipe_models::{Device, Model};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir(name: &str) -> PathBuf {
    repo().join("data-samples/models").join(name)
}

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

/// A golden case's settings as trainer options.
fn options(case: &Value, step: &Value) -> TrainOptions {
    let f = |k: &str| case[k].as_f64();
    let method = match case["method"].as_str().unwrap() {
        "dpo" => Method::Dpo,
        "orpo" => Method::Orpo,
        "simpo" => Method::Simpo,
        m => panic!("unknown method {m}"),
    };
    let dpo_loss = match case["loss"].as_str().unwrap_or("sigmoid") {
        "sigmoid" => DpoLoss::Sigmoid,
        "hinge" => DpoLoss::Hinge,
        "ipo" => DpoLoss::Ipo,
        "robust" => DpoLoss::Robust,
        l => panic!("unknown loss {l}"),
    };
    TrainOptions {
        method,
        beta: f("beta").or(f("lambda")).unwrap(),
        dpo_loss,
        label_smoothing: f("label_smoothing").unwrap_or(0.0),
        nll_weight: f("nll_weight").unwrap_or(0.0),
        gamma: f("gamma").unwrap_or(0.0),
        lr: step["lr"].as_f64().unwrap(),
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        shuffle: false,
        max_steps: Some(case["losses"].as_array().unwrap().len() as u64),
        max_grad_norm: Some(step["max_grad_norm"].as_f64().unwrap()),
        adam: AdamWConfig { weight_decay: step["weight_decay"].as_f64().unwrap(), ..Default::default() },
        ..Default::default()
    }
}

/// Every case's step-1 loss within 1e-5 relative of TRL's, and the losses of
/// steps 2–4 (after 1–3 clipped AdamW updates, torch.optim.AdamW in the
/// script) within 1e-4; the step-1 metrics TRL logs within 1e-4.
#[test]
fn losses_match_trl() {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("tests/golden/objectives/golden.json")).unwrap()).unwrap();
    let pairs: Vec<Value> = std::fs::read_to_string(repo().join("tests/golden/objectives/pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let policy = Model::load_trainable(&model_dir(case["model"].as_str().unwrap()), &Device::Cpu).unwrap();
        let s = |v: &Value| v.as_str().unwrap().to_string();
        let examples: Vec<Example> = pairs
            .iter()
            .map(|r| {
                Example::pair(
                    policy.encode_prompt(&s(&r["prompt"]), false).unwrap(),
                    policy.encode_response(&s(&r["chosen"])).unwrap(),
                    policy.encode_response(&s(&r["rejected"])).unwrap(),
                )
            })
            .collect();
        let opts = options(case, &g["optimizer_step"]);
        let reference = match case["reference"].as_str() {
            Some(r) => reference_logps(&Model::load(&model_dir(r), &Device::Cpu).unwrap(), &examples).unwrap(),
            None => {
                assert!(!opts.method.needs_reference(), "{name}");
                Vec::new()
            }
        };
        let mut t = Trainer::new(policy, examples, reference, opts, None).unwrap();
        t.run(&|_, _| {}).unwrap();
        let m = t.metrics();
        for (i, want) in case["losses"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let tol = if i == 0 { 1e-5 } else { 1e-4 };
            eprintln!("{name} step {}: {} vs TRL {want} (rel {:.1e})", i + 1, m[i].loss, ((m[i].loss - want) / want).abs());
            assert!(rel_close(m[i].loss, want, tol), "{name} step {} loss: {} vs TRL {want}", i + 1, m[i].loss);
        }
        let s1 = &case["step1"];
        let mut keys = vec![("reward_accuracy", m[0].reward_accuracy), ("reward_margin", m[0].reward_margin)];
        if s1.get("chosen_logp").is_some() {
            keys.extend([("chosen_logp", m[0].chosen_logp), ("rejected_logp", m[0].rejected_logp)]);
        }
        if s1.get("nll").is_some() {
            keys.push(("nll", m[0].nll));
        } else if case["nll_weight"].as_f64().is_none() {
            assert!(m[0].nll.is_nan(), "{name}: no NLL term, so no nll metric");
        }
        for (key, got) in keys {
            let want = s1[key].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{name} step 1 {key}: {got} vs TRL {want}");
        }
    }
}

const WORDS: [&str; 12] = ["sea", "blue", "river", "quick", "fox", "light", "stone", "green", "cloud", "paper", "music", "bread"];

/// The synthetic pairs of tests/train.rs: random sentences, chosen ends
/// " Thank you!", rejected " Go away!".
fn synthetic(m: &Model, n: usize, seed: u64) -> Vec<Example> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let mut words = |k: usize| (0..k).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ");
            let prompt = m.encode_prompt(&format!("Question {i}: tell me about {}.", words(2)), false).unwrap();
            let body = words(4);
            let resp = |s: &str| m.encode_response(&format!("The {body}.{s}")).unwrap();
            Example::pair(prompt, resp(" Thank you!"), resp(" Go away!"))
        })
        .collect()
}

/// Held-out accuracy of the objective's own implicit reward: the log-ratio
/// to the reference (DPO variants), or the length-averaged log-prob
/// (reference-free ORPO and SimPO); ties count ½.
fn heldout_accuracy(policy: &Model, reference: &Model, examples: &[Example], free: bool) -> f64 {
    let pol = reference_logps(policy, examples).unwrap();
    let refr = reference_logps(reference, examples).unwrap();
    let mut correct = 0.0;
    for ((e, p), r) in examples.iter().zip(&pol).zip(&refr) {
        let d = if free { p[0] / e.responses[0].len() as f64 - p[1] / e.responses[1].len() as f64 } else { (p[0] - r[0]) - (p[1] - r[1]) };
        correct += if d > 0.0 {
            1.0
        } else if d == 0.0 {
            0.5
        } else {
            0.0
        };
    }
    correct / examples.len() as f64
}

/// SLiC, IPO, robust DPO, DPO + NLL, ORPO and SimPO each reach held-out
/// accuracy ≥ 0.9 on the checkpoint loaded back from disk, and lower their loss.
#[test]
fn every_objective_learns_the_synthetic_preference() {
    let dir = model_dir("tiny-llama");
    let reference = Model::load(&dir, &Device::Cpu).unwrap();
    let train = synthetic(&reference, 48, 1);
    let heldout = synthetic(&reference, 24, 2);
    let ref_logps = reference_logps(&reference, &train).unwrap();
    let base = TrainOptions { beta: 0.1, lr: 1e-3, epochs: 2, batch_size: 8, seed: 3, ..Default::default() };
    let cases = [
        ("slic", TrainOptions { dpo_loss: DpoLoss::Hinge, ..base.clone() }),
        ("ipo", TrainOptions { dpo_loss: DpoLoss::Ipo, ..base.clone() }),
        ("robust", TrainOptions { dpo_loss: DpoLoss::Robust, label_smoothing: 0.1, ..base.clone() }),
        ("dpo+nll", TrainOptions { nll_weight: 1.0, ..base.clone() }),
        ("orpo", TrainOptions { method: Method::Orpo, beta: 1.0, ..base.clone() }),
        ("simpo", TrainOptions { method: Method::Simpo, beta: 2.0, gamma: 0.5, ..base.clone() }),
    ];
    for (name, opts) in cases {
        let free = !opts.method.needs_reference();
        let r = if free { Vec::new() } else { ref_logps.clone() };
        let mut t = Trainer::new(Model::load_trainable(&dir, &Device::Cpu).unwrap(), train.clone(), r, opts, None).unwrap();
        t.run(&|_, _| {}).unwrap();
        let out = tempfile::tempdir().unwrap();
        t.save_pretrained(out.path()).unwrap();
        let trained = Model::load(out.path(), &Device::Cpu).unwrap();
        let acc = heldout_accuracy(&trained, &reference, &heldout, free);
        let m = t.metrics();
        eprintln!("{name}: held-out accuracy {acc}, loss {} → {}", m[0].loss, m.last().unwrap().loss);
        assert!(acc >= 0.9, "{name}: held-out implicit-reward accuracy {acc}");
        assert!(m.last().unwrap().loss < m[0].loss, "{name}: loss {} → {}", m[0].loss, m.last().unwrap().loss);
    }
}

/// Reference-free objectives ignore any reference log-probs they are handed,
/// and bad settings are refused by name.
#[test]
fn options_are_checked() {
    let bad = |o: TrainOptions| o.validate().unwrap_err().to_string();
    assert!(bad(TrainOptions { dpo_loss: DpoLoss::Robust, label_smoothing: 0.5, ..Default::default() }).contains("label_smoothing"));
    assert!(bad(TrainOptions { dpo_loss: DpoLoss::Robust, label_smoothing: -0.1, ..Default::default() }).contains("label_smoothing"));
    assert!(bad(TrainOptions { label_smoothing: 0.1, ..Default::default() }).contains("label_smoothing"));
    assert!(bad(TrainOptions { method: Method::Simpo, gamma: -1.0, ..Default::default() }).contains("gamma"));
    assert!(bad(TrainOptions { nll_weight: -1.0, ..Default::default() }).contains("nll_weight"));
    assert!(bad(TrainOptions { dpo_loss: DpoLoss::Ipo, beta: 0.0, ..Default::default() }).contains("beta"));
    assert!(TrainOptions { dpo_loss: DpoLoss::Robust, label_smoothing: 0.25, ..Default::default() }.validate().is_ok());
}

//! Criterion benches of the selection strategies on an in-memory scored
//! batch (no I/O): `cargo bench --bench select`.

use std::sync::Arc;

use arrow::array::{Float64Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prefpipe_select::{Input, SELECT};

/// `prompts` × 5 samples with pseudo-random rewards (a 64-bit LCG).
/// The generated table's columns: prompt_id, prompt, sample_idx, response, reward, logp_policy, logp_reference.
type Columns = (Vec<String>, Vec<String>, Vec<u32>, Vec<String>, Vec<f64>, Vec<f64>, Vec<f64>);

fn scored(prompts: usize) -> RecordBatch {
    let n = 5;
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut rnd = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut cols: Columns = Default::default();
    for p in 0..prompts {
        for s in 0..n {
            cols.0.push(format!("p{p:07}"));
            cols.1.push(format!("Prompt {p}"));
            cols.2.push(s as u32);
            cols.3.push(format!("Response {s} to {p}"));
            cols.4.push(rnd() * 6.0 - 3.0);
            cols.5.push(-40.0 - rnd() * 20.0);
            cols.6.push(-40.0 - rnd() * 20.0);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt_id", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("sample_idx", DataType::UInt32, false),
        Field::new("response", DataType::Utf8, false),
        Field::new("reward", DataType::Float64, false),
        Field::new("logp_policy", DataType::Float64, false),
        Field::new("logp_reference", DataType::Float64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(cols.0)),
            Arc::new(StringArray::from(cols.1)),
            Arc::new(UInt32Array::from(cols.2)),
            Arc::new(StringArray::from(cols.3)),
            Arc::new(Float64Array::from(cols.4)),
            Arc::new(Float64Array::from(cols.5)),
            Arc::new(Float64Array::from(cols.6)),
        ],
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let batch = scored(20_000);
    let mut g = c.benchmark_group("select_100k_rows");
    g.throughput(Throughput::Elements(batch.num_rows() as u64));
    g.sample_size(20);
    for (name, cfg) in [
        ("max_min", serde_json::json!({})),
        ("reward_points", serde_json::json!({"chosen": "max", "rejected": "mu-2sigma"})),
        ("small_margin", serde_json::json!({"keep": 0.5})),
    ] {
        let Some(kind) = SELECT.iter().find(|k| k.name == name) else { continue };
        let strategy = (kind.build)(&cfg).unwrap_or_else(|_| panic!("{name} builds"));
        let schema = strategy.plan(&[Input { id: "scored", schema: batch.schema().as_ref() }]).unwrap();
        g.bench_function(name, |b| b.iter(|| strategy.run(std::slice::from_ref(&batch), &schema).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

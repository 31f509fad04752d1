//! `prefpipe inspect FILE.parquet`: schema, row count, column statistics,
//! and terminal histograms of reward and margin columns.

use std::collections::HashSet;
use std::path::Path;

use arrow::array::{Array, Float64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use prefpipe_core::io;

pub fn run(file: &Path) -> anyhow::Result<()> {
    let schema = io::parquet_schema(file)?;
    let batches = io::read_parquet(file)?;
    let all = arrow::compute::concat_batches(&schema, &batches)?;
    let n = all.num_rows();
    println!("{}: {} rows, {} columns\n", file.display(), n, schema.fields().len());
    println!("{:<24} {:<28} {:>8}  stats", "column", "type", "nulls");
    let mut hist = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let a = all.column(i);
        let t = f.data_type();
        let stats = if t.is_numeric() {
            let v = cast(a, &DataType::Float64)?;
            let v = v.as_any().downcast_ref::<Float64Array>().expect("f64").clone();
            let vals: Vec<f64> = v.iter().flatten().collect();
            let finite: Vec<f64> = vals.iter().copied().filter(|x| x.is_finite()).collect();
            if matches!(t, DataType::Float32 | DataType::Float64) && (f.name().contains("reward") || f.name().contains("margin")) {
                hist.push((f.name().clone(), finite.clone()));
            }
            if finite.is_empty() {
                String::new()
            } else {
                let mean = finite.iter().sum::<f64>() / finite.len() as f64;
                let sd = (finite.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / finite.len() as f64).sqrt();
                let (lo, hi) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
                let nonfinite = vals.len() - finite.len();
                let nf = if nonfinite > 0 { format!(" non-finite={nonfinite}") } else { String::new() };
                format!("min={} max={} mean={:.4} std={:.4}{nf}", num(lo), num(hi), mean, sd)
            }
        } else if matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
            let s = cast(a, &DataType::Utf8)?;
            let s = s.as_any().downcast_ref::<StringArray>().expect("utf8").clone();
            let distinct: HashSet<&str> = s.iter().flatten().collect();
            let lens: Vec<usize> = s.iter().flatten().map(|x| x.chars().count()).collect();
            let mean_len = if lens.is_empty() { 0.0 } else { lens.iter().sum::<usize>() as f64 / lens.len() as f64 };
            format!("distinct={} mean_chars={:.1}", distinct.len(), mean_len)
        } else {
            String::new()
        };
        println!("{:<24} {:<28} {:>8}  {}", f.name(), t.to_string(), a.null_count(), stats);
    }
    // The length-bias line (DESIGN §14): pairs and lists with token counts.
    if let Some(lb) = prefpipe_select::tokens::length_bias(std::slice::from_ref(&all))? {
        println!("\nlength bias: {}", lb.line());
    }
    for (name, vals) in hist {
        println!("\n{name}");
        print!("{}", histogram(&vals, 10, 40));
    }
    Ok(())
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.4}")
    }
}

/// A text histogram: `bins` rows, bars scaled to `width` characters.
pub fn histogram(vals: &[f64], bins: usize, width: usize) -> String {
    if vals.is_empty() {
        return "  (no finite values)\n".into();
    }
    let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut counts = vec![0usize; bins];
    for &v in vals {
        let b = (((v - lo) / span) * bins as f64).floor() as usize;
        counts[b.min(bins - 1)] += 1;
    }
    let max = *counts.iter().max().unwrap_or(&1);
    let mut s = String::new();
    for (i, c) in counts.iter().enumerate() {
        let from = lo + span * i as f64 / bins as f64;
        let bar = "█".repeat((c * width).div_ceil(max.max(1)));
        s.push_str(&format!("  {from:>10.3} | {bar:<width$} {c}\n"));
    }
    s
}

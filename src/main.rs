//! The `prefpipe` command line. `anyhow` lives only here; library errors are
//! flattened to one line each, and the exit code says what went wrong:
//! 0 success, 1 a stage failed at run time, 2 invalid pipeline, arguments or input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use prefpipe_core::exec::{self, RunOptions};
use prefpipe_core::location::StoreLocation;
use prefpipe_core::shard::Shard;
use prefpipe_core::store::Store;
use prefpipe_core::{plan, spec, Error};

mod inspect;
mod progress;
mod query;
mod report;
mod schemas;

#[derive(Parser)]
#[command(name = "prefpipe", version, about = "Build preference datasets for LLM post-training, and train on them")]
struct Cli {
    /// Log format for progress and results on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline; finished stages are reused, interrupted ones resume.
    Run {
        pipeline: PathBuf,
        /// The run store (content-addressed outputs, manifests, lock): a
        /// directory or an s3://, gs://, az://, file:// URL (DESIGN §13).
        #[arg(long, default_value = ".prefpipe")]
        store: String,
        /// Run shard I of N: chunk k of each per-chunk stage only when
        /// k mod N = I; stages that need their whole input wait for a run
        /// without --shard.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Override a stage setting: STAGE.KEY=VALUE (KEY may be dotted).
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
        /// Run only this stage and the stages it needs.
        #[arg(long)]
        until: Option<String>,
        /// Recompute this stage and everything downstream.
        #[arg(long)]
        force: Vec<String>,
    },
    /// Check a pipeline; print every problem with its line:col.
    Validate {
        pipeline: PathBuf,
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Show the stages in run order with their status in the store.
    Plan {
        pipeline: PathBuf,
        #[arg(long, default_value = ".prefpipe")]
        store: String,
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Run SQL (DataFusion) over a pipeline's finished stages or Parquet files.
    Query {
        sql: String,
        /// Register every finished stage of this pipeline under its id.
        #[arg(long)]
        pipeline: Vec<PathBuf>,
        /// Register a Parquet file: NAME=FILE.
        #[arg(long = "table", value_name = "NAME=FILE")]
        tables: Vec<String>,
        /// The run store: a directory or an object-store URL.
        #[arg(long, default_value = ".prefpipe")]
        store: String,
        #[arg(long, value_enum, default_value_t = query::OutFormat::Table)]
        format: query::OutFormat,
        /// Write the result here instead of stdout (required for parquet).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write one self-contained HTML report of a finished run (DESIGN §14).
    Report {
        pipeline: PathBuf,
        /// The run store: a directory or an object-store URL.
        #[arg(long, default_value = ".prefpipe")]
        store: String,
        /// The HTML file to write (default: <store>/report.html; report.html
        /// here for an object store).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The `--set` overrides the run used.
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Schema, row count, column statistics and reward histograms of a Parquet file.
    Inspect { file: PathBuf },
    /// Write the JSON Schemas of the pipeline YAML and of every table.
    Schema {
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
    /// List stage kinds and strategies.
    Kinds,
    /// Write tiny random Hugging Face-format models (Llama, Qwen2, …, and a
    /// Llama reward model) for tests and demos.
    Fixtures {
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<Error>().map(Error::exit_code).unwrap_or(2);
            let msg = match e.downcast_ref::<Error>() {
                Some(Error::Invalid(d)) => d.iter().map(|d| format!("error: {d}")).collect::<Vec<_>>().join("\n"),
                _ => {
                    // A cause whose text its wrapper already shows (`stage `x`: {source}`) is not repeated.
                    let mut parts: Vec<String> = Vec::new();
                    for c in e.chain().map(|c| c.to_string()) {
                        if !parts.last().is_some_and(|p| p.ends_with(&c)) {
                            parts.push(c);
                        }
                    }
                    format!("error: {}", parts.join(": "))
                }
            };
            let _ = writeln!(std::io::stderr(), "{msg}");
            ExitCode::from(code as u8)
        }
    }
}

/// Loads a pipeline with `--set` overrides and plans it.
fn load_plan(path: &Path, sets: &[String]) -> anyhow::Result<plan::Plan> {
    let mut s = spec::load(path)?;
    for a in sets {
        s.set(a)?;
    }
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(plan::build(s, base, prefpipe_stages::KINDS)?)
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run { pipeline, store, shard, sets, until, force } => {
            let location = StoreLocation::parse(&store)?;
            let shard: Option<Shard> = shard.as_deref().map(str::parse).transpose()?;
            if let (Some(s), Some(f)) = (shard, force.first()) {
                return Err(
                    Error::Input(format!("--force {f} with --shard {s}: shards share the store; force in a run without --shard")).into()
                );
            }
            let plan = load_plan(&pipeline, &sets)?;
            let mut store = Store::open(&location, shard)?;
            let reporter = progress::Reporter::new(cli.log_format);
            let report = exec::run(&plan, &store, &RunOptions { until, force }, &reporter)?;
            for card in prefpipe_stages::export::card::write_cards(&plan, &store)? {
                reporter.card(&card);
            }
            if let Some(s) = shard {
                let left: Vec<&str> = report.stages.iter().filter(|r| r.status == "deferred").map(|r| r.id.as_str()).collect();
                reporter.shard_done(&s.to_string(), &left);
            }
            reporter.finish(&report, &store.location_of(&store.run_json_path()));
            store.finish();
            Ok(())
        }
        Cmd::Validate { pipeline, sets } => {
            let plan = load_plan(&pipeline, &sets)?;
            println!("{}: ok ({} stages)", pipeline.display(), plan.stages.len());
            Ok(())
        }
        Cmd::Plan { pipeline, store, sets } => {
            let plan = load_plan(&pipeline, &sets)?;
            let rows = exec::status(&plan, &Store::open_read_at(&StoreLocation::parse(&store)?)?)?;
            let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
            let k = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
            for (id, kind, status) in rows {
                println!("{id:<w$}  {kind:<k$}  {status}");
            }
            Ok(())
        }
        Cmd::Query { sql, pipeline, tables, store, format, out } => {
            let mut registered = Vec::new();
            let location = StoreLocation::parse(&store)?;
            let opened = if pipeline.is_empty() { None } else { Some(Store::open_read_at(&location)?) };
            for p in &pipeline {
                let plan = load_plan(p, &[])?;
                registered.extend(query::finished_tables(&plan, opened.as_ref().expect("opened for --pipeline"))?);
            }
            for t in &tables {
                registered.push(query::file_table(t)?);
            }
            let remote = opened.as_ref().and_then(|s| s.remote()).map(|r| (r.url.base.clone(), r.object_store()));
            query::run(&sql, &registered, remote, format, out.as_deref())
        }
        Cmd::Report { pipeline, store, out, sets } => {
            let plan = load_plan(&pipeline, &sets)?;
            let location = StoreLocation::parse(&store)?;
            let opened = Store::open_read_at(&location)?;
            let out = out.unwrap_or_else(|| match &location {
                StoreLocation::Local(dir) => dir.join("report.html"),
                _ => PathBuf::from("report.html"),
            });
            let path = report::run(&plan, &pipeline, &opened, &store, &out)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Cmd::Inspect { file } => inspect::run(&file),
        Cmd::Schema { out } => schemas::write(&out),
        Cmd::Fixtures { dir, seed } => {
            use prefpipe_models::Family;
            for (name, fam) in [
                ("tiny-llama", Family::Llama),
                ("tiny-qwen2", Family::Qwen2),
                ("tiny-qwen3", Family::Qwen3),
                ("tiny-mistral", Family::Mistral),
            ] {
                prefpipe_models::write_fixture(&dir.join(name), fam, seed).map_err(|e| Error::Runtime(e.to_string()))?;
                println!("wrote {}", dir.join(name).display());
            }
            prefpipe_models::write_reward_fixture(&dir.join("tiny-llama-rm"), Family::Llama, seed + 1)
                .map_err(|e| Error::Runtime(e.to_string()))?;
            println!("wrote {}", dir.join("tiny-llama-rm").display());
            Ok(())
        }
        Cmd::Kinds => {
            for k in prefpipe_stages::KINDS {
                println!("{:<8} {}", k.name, k.about);
            }
            println!("\nselect strategies:");
            for s in prefpipe_select::SELECT {
                println!("  {:<16} {}", s.name, s.about);
            }
            println!("\nfilter strategies:");
            for s in prefpipe_select::FILTER {
                println!("  {:<16} {}", s.name, s.about);
            }
            println!("  {:<16} {}", prefpipe_select::ches::NAME, prefpipe_select::ches::ABOUT);
            Ok(())
        }
    }
}

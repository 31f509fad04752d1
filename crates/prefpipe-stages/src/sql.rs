//! `sql`: DataFusion SQL over upstream tables, each registered under its
//! stage id. Also the engine behind `prefpipe query`.

use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::{Error, Result};
use serde::{Deserialize, Serialize};

pub const KIND: StageKind = StageKind {
    name: "sql",
    about: "DataFusion SQL over upstream tables by stage id",
    arity: Arity::Many,
    build: |v| {
        let c: SqlConfig = from_config(v)?;
        if c.query.trim().is_empty() {
            return Err(vec![ConfigError::at("query", "`query` is empty")]);
        }
        Ok(Box::new(Sql { c }))
    },
    schema: || schemars::schema_for!(SqlConfig),
};

/// `kind: sql`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// A SQL query; each `input:` stage is a table named by its id. Without
    /// an ORDER BY, rows come in DataFusion's (single-partition, deterministic) order.
    pub query: String,
}

struct Sql {
    c: SqlConfig,
}

/// Runs a future to completion on a private runtime (DataFusion is async).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(f)
}

/// A session with one partition: same inputs ⇒ same row order.
pub fn deterministic_context() -> SessionContext {
    SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1))
}

/// Registers a finished table: its chunk files as one Parquet listing table.
pub fn register(ctx: &SessionContext, t: &Table) -> Result<()> {
    let provider: Arc<dyn datafusion::catalog::TableProvider> = if t.files.is_empty() {
        Arc::new(MemTable::try_new(t.schema.clone(), vec![vec![]]).map_err(df_err)?)
    } else {
        let urls = t
            .files
            .iter()
            .map(|f| {
                // An object-store URL (`prefpipe query --store s3://…`) is read in place.
                let s = f.to_string_lossy();
                if s.split_once("://").is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric())) {
                    return ListingTableUrl::parse(s).map_err(df_err);
                }
                let abs = std::path::absolute(f).map_err(|e| Error::io(f, e))?;
                ListingTableUrl::parse(abs.to_string_lossy()).map_err(df_err)
            })
            .collect::<Result<Vec<_>>>()?;
        let opts = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let cfg = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(opts).with_schema(t.schema.clone());
        Arc::new(ListingTable::try_new(cfg).map_err(df_err)?)
    };
    ctx.register_table(t.id.as_str(), provider).map_err(df_err)?;
    Ok(())
}

fn df_err(e: datafusion::error::DataFusionError) -> Error {
    Error::Input(one_line(&e.to_string()))
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

/// Output schema of a query over tables with these schemas (no data read).
pub fn query_schema(query: &str, tables: &[(String, SchemaRef)]) -> Result<SchemaRef, String> {
    let ctx = deterministic_context();
    for (id, s) in tables {
        let t = MemTable::try_new(s.clone(), vec![vec![]]).map_err(|e| e.to_string())?;
        ctx.register_table(id.as_str(), Arc::new(t)).map_err(|e| e.to_string())?;
    }
    let df = block_on(ctx.sql(query)).map_err(|e| one_line(&e.to_string()))?;
    Ok(nullable(df.schema().as_arrow()))
}

/// The planned schema with every column nullable: SQL may produce nulls the
/// inputs' schemas do not predict.
fn nullable(s: &Schema) -> SchemaRef {
    Arc::new(Schema::new(s.fields().iter().map(|f| Field::new(f.name(), f.data_type().clone(), true)).collect::<Vec<_>>()))
}

impl Stage for Sql {
    fn mode(&self) -> Mode {
        Mode::Whole
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn output_aligned(&self, _: bool) -> bool {
        false
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let tables: Vec<(String, SchemaRef)> = cx.input_ids.iter().cloned().zip(inputs.iter().cloned()).collect();
        query_schema(&self.c.query, &tables).map_err(|m| vec![ConfigError::at("query", m)])
    }

    fn run(&self, _cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let ctx = deterministic_context();
        for t in inputs {
            register(&ctx, t)?;
        }
        let batches = block_on(async { ctx.sql(&self.c.query).await?.collect().await }).map_err(df_err)?;
        let tables: Vec<(String, SchemaRef)> = inputs.iter().map(|t| (t.id.clone(), t.schema.clone())).collect();
        let schema = query_schema(&self.c.query, &tables).map_err(Error::Input)?;
        let batches = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Output { batches, ..Default::default() })
    }
}

/// Runs SQL over finished tables (for `prefpipe query`).
pub fn query(sql: &str, tables: &[Table]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    query_with(sql, tables, &[])
}

/// [`query`] with object stores registered (`scheme://bucket` → store), so
/// tables whose files are URLs are read straight from the store (DESIGN §13).
pub fn query_with(
    sql: &str,
    tables: &[Table],
    stores: &[(String, Arc<dyn prefpipe_core::objstore::ObjectStore>)],
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let ctx = SessionContext::new();
    for (base, store) in stores {
        let url = datafusion::execution::object_store::ObjectStoreUrl::parse(base).map_err(df_err)?;
        ctx.register_object_store(url.as_ref(), store.clone());
    }
    for t in tables {
        register(&ctx, t)?;
    }
    block_on(async {
        let df = ctx.sql(sql).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok::<_, datafusion::error::DataFusionError>((schema, batches))
    })
    .map_err(df_err)
}

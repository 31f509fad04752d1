//! The shared body of `select` and `filter`: a stage that runs a strategy
//! from a registry list in `prefpipe-select`.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use prefpipe_core::error::closest;
use prefpipe_core::stage::{ConfigError, Mode, Output, PlanCx, RunCx, Stage, Table};
use prefpipe_core::Result;
use prefpipe_select::{Input, Strategy, StrategyKind};

pub struct StrategyStage {
    pub name: &'static str,
    pub strategy: Box<dyn Strategy>,
}

/// Splits `strategy:` off the config and builds it from `list`.
/// `extra` names strategies the stage handles itself (listed in messages).
pub fn build(
    v: &serde_json::Value,
    stage: &str,
    list: &'static [StrategyKind],
    extra: &[&'static str],
) -> Result<StrategyStage, Vec<ConfigError>> {
    let names: Vec<&str> = list.iter().map(|k| k.name).chain(extra.iter().copied()).collect();
    let mut rest = v.as_object().cloned().unwrap_or_default();
    let Some(name) = rest.remove("strategy") else {
        return Err(vec![ConfigError::new(format!("a `{stage}` stage needs a `strategy` (one of: {})", names.join(", ")))]);
    };
    let Some(name) = name.as_str() else {
        return Err(vec![ConfigError::at("strategy", "`strategy` must be a string")]);
    };
    let Some(kind) = list.iter().find(|k| k.name == name) else {
        let hint = closest(name, names.iter().copied()).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
        return Err(vec![ConfigError::at(
            "strategy",
            format!("unknown {stage} strategy `{name}`{hint} (strategies: {})", names.join(", ")),
        )]);
    };
    let strategy = (kind.build)(&serde_json::Value::Object(rest))?;
    Ok(StrategyStage { name: kind.name, strategy })
}

/// JSON Schema of a strategy stage: `strategy` plus one of the strategies' configs.
/// `extra`: one more strategy (name, about, schema) handled by the stage itself.
pub fn schema(stage: &str, list: &'static [StrategyKind], extra: Option<(&str, &str, schemars::Schema)>) -> schemars::Schema {
    let variants: Vec<serde_json::Value> = list
        .iter()
        .map(|k| (k.name, k.about, (k.schema)()))
        .chain(extra)
        .map(|(name, about, schema)| {
            let mut s = serde_json::to_value(schema).expect("schema serializes");
            if let Some(o) = s.as_object_mut() {
                o.remove("$schema");
                o.insert("description".into(), about.into());
                let props = o.entry("properties").or_insert_with(|| serde_json::json!({}));
                props.as_object_mut().expect("properties").insert("strategy".into(), serde_json::json!({"const": name}));
                let req = o.entry("required").or_insert_with(|| serde_json::json!([]));
                req.as_array_mut().expect("required").push("strategy".into());
            }
            s
        })
        .collect();
    let v = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": stage,
        "oneOf": variants,
    });
    schemars::Schema::try_from(v).expect("a JSON object")
}

impl Stage for StrategyStage {
    fn mode(&self) -> Mode {
        self.strategy.mode()
    }

    fn config(&self) -> serde_json::Value {
        let mut v = self.strategy.config();
        if let Some(o) = v.as_object_mut() {
            o.insert("strategy".into(), self.name.into());
        }
        v
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let ins: Vec<Input> = cx.input_ids.iter().zip(inputs).map(|(id, s)| Input { id, schema: s.as_ref() }).collect();
        self.strategy.plan(&ins)
    }

    fn parallel_chunks(&self) -> bool {
        true
    }

    fn output_aligned(&self, input_aligned: bool) -> bool {
        input_aligned || self.strategy.mode() == Mode::Whole
    }

    fn run(&self, _cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let batches: Vec<RecordBatch> = inputs.iter().map(Table::read_one).collect::<Result<_>>()?;
        let schema = self.plan_schema(inputs);
        let mut out = self.strategy.run(&batches, &schema)?;
        out.rows_in = batches.iter().map(|b| b.num_rows() as u64).sum();
        Ok(out)
    }
}

impl StrategyStage {
    fn plan_schema(&self, inputs: &[Table]) -> SchemaRef {
        let ins: Vec<Input> = inputs.iter().map(|t| Input { id: &t.id, schema: t.schema.as_ref() }).collect();
        self.strategy.plan(&ins).expect("planned before")
    }
}

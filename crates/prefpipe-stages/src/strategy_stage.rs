//! The shared body of `select` and `filter`: a stage that runs a strategy
//! from a registry list in `prefpipe-select`.
//!
//! A `select` stage also takes `carry: [col, ...]`: input columns to keep in
//! the pairs or lists table although the strategy would leave them out (a
//! per-prompt float such as a difficulty score: floats are taken for
//! per-sample scores). Each must hold one value per prompt, else the run
//! fails naming the prompt. The input columns the output leaves out are
//! listed in `run.json` (`dropped_columns`).

use std::sync::Arc;

use arrow::array::{make_comparator, Array};
use arrow::compute::SortOptions;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::error::closest;
use prefpipe_core::stage::{ConfigError, Mode, Output, PlanCx, RunCx, Stage, Table};
use prefpipe_core::table::{col, str_col};
use prefpipe_core::yaml::PathSeg;
use prefpipe_core::{Error, Result};
use prefpipe_select::{Input, Strategy, StrategyKind};

pub struct StrategyStage {
    pub name: &'static str,
    pub strategy: Box<dyn Strategy>,
    /// `carry:` (select only): input columns kept in the output.
    pub carry: Vec<String>,
}

/// Input columns a pairs or lists table holds in another form (`chosen`,
/// `chosen_idx`, `chosen_reward`, …), so not listed as dropped.
const REPRESENTED: [&str; 3] = [col::SAMPLE_IDX, col::RESPONSE, col::REWARD];

fn at_carry(i: usize, message: String) -> ConfigError {
    ConfigError { path: vec![PathSeg::Key("carry".into()), PathSeg::Index(i)], message }
}

/// Splits `strategy:` (and, when `carry` is allowed, `carry:`) off the
/// config and builds the strategy from `list`. `extra` names strategies the
/// stage handles itself (listed in messages).
pub fn build(
    v: &serde_json::Value,
    stage: &str,
    list: &'static [StrategyKind],
    extra: &[&'static str],
    carry: bool,
) -> Result<StrategyStage, Vec<ConfigError>> {
    let names: Vec<&str> = list.iter().map(|k| k.name).chain(extra.iter().copied()).collect();
    let mut rest = v.as_object().cloned().unwrap_or_default();
    let carried = match rest.remove("carry").filter(|_| carry) {
        None => Vec::new(),
        Some(c) => match serde_json::from_value::<Vec<String>>(c) {
            Ok(c) => c,
            Err(_) => return Err(vec![ConfigError::at("carry", "`carry` is a list of column names")]),
        },
    };
    if !carry && v.get("carry").is_some() {
        return Err(vec![ConfigError::at("carry", format!("`carry` is for `select` stages; a `{stage}` keeps every input column"))]);
    }
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
    let mut errs = Vec::new();
    for (i, c) in carried.iter().enumerate() {
        if carried[..i].contains(c) {
            errs.push(at_carry(i, format!("`{c}` is named twice")));
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(StrategyStage { name: kind.name, strategy, carry: carried })
}

/// JSON Schema of a strategy stage: `strategy` plus one of the strategies' configs.
/// `extra`: one more strategy (name, about, schema) handled by the stage itself.
/// `carry`: whether the stage takes `carry:` (select).
pub fn schema(stage: &str, list: &'static [StrategyKind], extra: Option<(&str, &str, schemars::Schema)>, carry: bool) -> schemars::Schema {
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
                if carry {
                    props.as_object_mut().expect("properties").insert(
                        "carry".into(),
                        serde_json::json!({
                            "description": "Input columns to keep in the output although the strategy leaves them out (e.g. a per-prompt float); each must hold one value per prompt.",
                            "type": "array",
                            "items": {"type": "string"}
                        }),
                    );
                }
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
            if !self.carry.is_empty() {
                o.insert("carry".into(), self.carry.clone().into());
            }
        }
        v
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let ins: Vec<Input> = cx.input_ids.iter().zip(inputs).map(|(id, s)| Input { id, schema: s.as_ref() }).collect();
        let schema = self.strategy.plan(&ins)?;
        self.with_carry(&schema, &ins[0])
    }

    fn dropped_columns(&self, inputs: &[SchemaRef], output: &Schema) -> Vec<String> {
        // The items table (the first input): a rankings table beside it is read whole, as ballots.
        let Some(input) = inputs.first() else { return Vec::new() };
        input
            .fields()
            .iter()
            .map(|f| f.name())
            .filter(|n| output.field_with_name(n).is_err() && !REPRESENTED.contains(&n.as_str()))
            .cloned()
            .collect()
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
        if let Some(b) = batches.first() {
            self.check_carried(b, &inputs[0].id)?;
        }
        let mut out = self.strategy.run(&batches, &schema)?;
        out.rows_in = batches.iter().map(|b| b.num_rows() as u64).sum();
        Ok(out)
    }
}

impl StrategyStage {
    fn plan_schema(&self, inputs: &[Table]) -> SchemaRef {
        let ins: Vec<Input> = inputs.iter().map(|t| Input { id: &t.id, schema: t.schema.as_ref() }).collect();
        let schema = self.strategy.plan(&ins).expect("planned before");
        self.with_carry(&schema, &ins[0]).expect("planned before")
    }

    /// The strategy's schema plus the `carry:` columns, which every strategy
    /// takes by name from its chosen (or best) row, like its own carried ones.
    fn with_carry(&self, schema: &SchemaRef, input: &Input) -> Result<SchemaRef, Vec<ConfigError>> {
        if self.carry.is_empty() {
            return Ok(schema.clone());
        }
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut errs = Vec::new();
        for (i, c) in self.carry.iter().enumerate() {
            match (input.schema.field_with_name(c), schema.field_with_name(c)) {
                (Err(_), _) => {
                    let names = input.schema.fields().iter().map(|f| f.name().as_str());
                    let hint = closest(c, names).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
                    errs.push(at_carry(i, format!("input `{}` has no column `{c}`{hint}", input.id)));
                }
                (Ok(_), Ok(_)) => errs.push(at_carry(i, format!("the output has a `{c}` column already"))),
                (Ok(f), Err(_)) => fields.push(f.clone()),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    /// Each `carry:` column must hold one value per prompt: a pair has one
    /// prompt but two samples, and which sample's value it kept would be a guess.
    fn check_carried(&self, batch: &RecordBatch, input: &str) -> Result<()> {
        if self.carry.is_empty() {
            return Ok(());
        }
        let ids = str_col(batch, col::PROMPT_ID)?;
        let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let cols: Vec<_> = self.carry.iter().map(|c| batch.column_by_name(c).expect("planned")).collect();
        let cmp: Vec<_> =
            cols.iter().map(|a| make_comparator(a.as_ref(), a.as_ref(), SortOptions::default())).collect::<std::result::Result<_, _>>()?;
        for r in 0..batch.num_rows() {
            let id = if ids.is_null(r) { "" } else { ids.value(r) };
            let f = *first.entry(id).or_insert(r);
            for (k, c) in cmp.iter().enumerate() {
                if c(f, r).is_ne() {
                    let show = |i: usize| arrow::util::display::array_value_to_string(cols[k].as_ref(), i).unwrap_or_default();
                    return Err(Error::Input(format!(
                        "input `{input}`: `carry` column `{}` is not one value per prompt: prompt `{id}` has {} and {}",
                        self.carry[k],
                        show(f),
                        show(r)
                    )));
                }
            }
        }
        Ok(())
    }
}

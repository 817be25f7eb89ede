//! The generated files' text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::{CodegenError, CodegenOptions, CustomOpImpl, GeneratedFile, package_name};
use crate::anno::{AttrKind, AttrSpec, Layout};
use crate::ir::{AttrValue, OpKind};
use crate::lower::{
    AdapterKind, Block, BlockKind, ExecProgram, LocalOp, Operand, ParamDecl, ParamInit, Segment,
    StageProgram, Step, Vid,
};
use crate::plan::{Recompute, Schedule, ZeroStage};

const KEYWORDS: &[&str] = &[
    "as",
    "async",
    "await",
    "break",
    "const",
    "continue",
    "crate",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "match",
    "mod",
    "move",
    "mut",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "struct",
    "super",
    "trait",
    "true",
    "type",
    "unsafe",
    "use",
    "where",
    "while",
    "yield",
    "w",
    "t",
    "tape",
    "tp",
    "tp_rank",
    "i",
    "keeps",
    "total_tokens",
];

fn ident(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, 'v');
    }
    if KEYWORDS.contains(&s.as_str()) {
        s.push('_');
    }
    s
}

fn f64_lit(v: f64) -> String {
    let s = format!("{v:?}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// A Rust expression for the runtime adapter `kind`.
fn adapter_expr(kind: AdapterKind) -> String {
    match kind {
        AdapterKind::AllReduce => "Adapter::AllReduce".into(),
        AdapterKind::Copy => "Adapter::Copy".into(),
        AdapterKind::Chunk { dim } => format!("Adapter::Chunk {{ dim: {dim} }}"),
        AdapterKind::Gather { dim } => format!("Adapter::Gather {{ dim: {dim} }}"),
        AdapterKind::GatherForShards { dim } => {
            format!("Adapter::GatherForShards {{ dim: {dim} }}")
        }
        AdapterKind::ReduceScatter { dim } => format!("Adapter::ReduceScatter {{ dim: {dim} }}"),
        AdapterKind::AllToAll { from, to } => {
            format!("Adapter::AllToAll {{ from: {from}, to: {to} }}")
        }
    }
}

/// Variable names for the parameters a block reads: `w_q_proj` for
/// `...q_proj.weight`, `b_q_proj` for a bias.
fn param_vars(block: &Block) -> Vec<(String, String)> {
    let mut patterns: Vec<&str> = Vec::new();
    for op in block.ops() {
        for operand in &op.inputs {
            if let Operand::Param(p) = operand
                && !patterns.contains(&p.as_str())
            {
                patterns.push(p);
            }
        }
    }
    let mut out = Vec::new();
    let mut taken = BTreeSet::new();
    for p in patterns {
        let segs: Vec<&str> = p.split('.').filter(|s| *s != "*").collect();
        let (prefix, rest) = match segs.last() {
            Some(&"weight") => ("w", &segs[..segs.len() - 1]),
            Some(&"bias") => ("b", &segs[..segs.len() - 1]),
            _ => ("p", &segs[..]),
        };
        let mut name = String::new();
        for k in 1..=rest.len().max(1) {
            let tail = rest[rest.len().saturating_sub(k)..].join("_");
            name = ident(&format!("{prefix}_{tail}"));
            if !taken.contains(&name) {
                break;
            }
        }
        while taken.contains(&name) {
            name.push('_');
        }
        taken.insert(name.clone());
        out.push((p.to_string(), name));
    }
    out
}

/// A Rust literal for attribute `spec` of custom op `op`: its value, else
/// the declared default.
fn custom_attr(op: &LocalOp, spec: &AttrSpec) -> Result<String, CodegenError> {
    let missing = || {
        CodegenError::Unsupported(format!(
            "{}: attribute '{}' has no value and no default",
            op.traced, spec.name
        ))
    };
    let value = match op.attrs.get(&spec.name) {
        Some(v) => v.clone(),
        None => {
            let text = spec.default.as_deref().ok_or_else(missing)?;
            match spec.kind {
                AttrKind::Int => AttrValue::Int(text.parse().map_err(|_| missing())?),
                AttrKind::Float => AttrValue::Float(text.parse().map_err(|_| missing())?),
                AttrKind::Bool => AttrValue::Bool(text.parse().map_err(|_| missing())?),
                AttrKind::Str => AttrValue::Str(text.to_string()),
            }
        }
    };
    Ok(match value {
        AttrValue::Int(i) => format!("{i}"),
        AttrValue::Float(f) => f64_lit(f),
        AttrValue::Bool(b) => format!("{b}"),
        AttrValue::Str(s) => format!("{s:?}"),
    })
}

struct BlockGen<'a> {
    custom: &'a BTreeMap<String, CustomOpImpl>,
    block: &'a Block,
    params: Vec<(String, String)>,
    /// Rust variable of each value.
    vars: Vec<String>,
}

impl<'a> BlockGen<'a> {
    fn new(block: &'a Block, custom: &'a BTreeMap<String, CustomOpImpl>) -> Self {
        let mut taken: BTreeSet<String> = BTreeSet::new();
        let params = param_vars(block);
        taken.extend(params.iter().map(|(_, v)| v.clone()));
        let vars = block
            .values
            .iter()
            .map(|v| {
                let mut name = ident(&v.name);
                while taken.contains(&name) {
                    name.push('_');
                }
                taken.insert(name.clone());
                name
            })
            .collect();
        Self {
            custom,
            block,
            params,
            vars,
        }
    }

    fn var(&self, v: Vid) -> &str {
        self.vars.get(v.index()).map_or("missing", String::as_str)
    }

    fn uses_tp_rank(&self) -> bool {
        self.block.ops().any(|op| op.offset_unit.is_some())
    }

    fn uses_tp(&self) -> bool {
        self.block.adapters().next().is_some()
    }

    fn uses_total_tokens(&self) -> bool {
        self.block.ops().any(|op| op.kind == OpKind::Mean)
    }

    fn op_call(
        &self,
        op: &LocalOp,
        arg: &dyn Fn(&Operand) -> String,
    ) -> Result<String, CodegenError> {
        let a = |i: usize| {
            op.inputs
                .get(i)
                .map(arg)
                .unwrap_or_else(|| "missing".into())
        };
        let offset = op
            .offset_unit
            .map_or_else(|| "0".to_string(), |u| format!("tp_rank * {u}"));
        let attr_f = |name: &str, default: f64| {
            op.attrs
                .get(name)
                .and_then(AttrValue::as_float)
                .unwrap_or(default)
        };
        let attr_i = |name: &str| op.attrs.get(name).and_then(AttrValue::as_int);
        Ok(match &op.kind {
            OpKind::Embedding => format!("ops::embedding({}, {}, {offset})?", a(0), a(1)),
            OpKind::PosEmbedding => format!(
                "ops::pos_embedding(&ops::positions({0}.size()[0], {0}.size()[1], 0)?, {1}, {offset})?",
                a(0),
                a(1)
            ),
            OpKind::Linear => format!("ops::linear({}, {})?", a(0), a(1)),
            OpKind::LinearBias => format!("ops::linear_bias({}, {}, {})?", a(0), a(1), a(2)),
            OpKind::RmsNorm => format!(
                "ops::rms_norm({}, {}, {})?",
                a(0),
                a(1),
                f64_lit(attr_f("eps", 1e-5))
            ),
            OpKind::LayerNorm => format!(
                "ops::layer_norm({}, {}, {}, {})?",
                a(0),
                a(1),
                a(2),
                f64_lit(attr_f("eps", 1e-5))
            ),
            OpKind::SplitHeads => {
                let h = attr_i("h").ok_or_else(|| {
                    CodegenError::Unsupported(format!("{}: split_heads without h", op.traced))
                })?;
                format!("ops::split_heads({}, {h})?", a(0))
            }
            OpKind::MergeHeads => format!("ops::merge_heads({})?", a(0)),
            OpKind::Rope => format!(
                "ops::rope({}, {}, {offset})?",
                a(0),
                f64_lit(attr_f("theta", 10000.0))
            ),
            OpKind::Attention => {
                let causal = op
                    .attrs
                    .get("causal")
                    .and_then(AttrValue::as_bool)
                    .unwrap_or(true);
                let mask = if causal { "Mask::Causal" } else { "Mask::Full" };
                format!("ops::attention({}, {}, {}, {mask})?", a(0), a(1), a(2))
            }
            OpKind::Add => format!("ops::add({}, {})?", a(0), a(1)),
            OpKind::SwiGlu => format!("ops::swiglu({}, {})?", a(0), a(1)),
            OpKind::Gelu => format!("ops::gelu({})?", a(0)),
            OpKind::CrossEntropy => format!("ops::cross_entropy({}, {})?", a(0), a(1)),
            OpKind::Mean => format!("ops::mean({}, total_tokens)?", a(0)),
            OpKind::Custom(name) => {
                let imp = self.custom.get(name).ok_or_else(|| {
                    CodegenError::Unsupported(format!(
                        "custom op '{name}' ({}) has no implementation to call",
                        op.traced
                    ))
                })?;
                if op.outputs.len() != 1 {
                    return Err(CodegenError::Unsupported(format!(
                        "custom op '{name}' ({}) has {} outputs; generated calls take one",
                        op.traced,
                        op.outputs.len()
                    )));
                }
                let mut args: Vec<String> = (0..op.inputs.len()).map(a).collect();
                for spec in &imp.attrs {
                    args.push(custom_attr(op, spec)?);
                }
                format!("{}({})?", imp.path, args.join(", "))
            }
        })
    }

    fn segment(&self, seg: &Segment, keep: &str, out: &mut String) -> Result<(), CodegenError> {
        let ins: Vec<&str> = seg.inputs.iter().map(|&v| self.var(v)).collect();
        let outs: Vec<&str> = seg.outputs.iter().map(|&v| self.var(v)).collect();
        let _ = writeln!(out);
        let lhs = format!("let [{}] = outputs(", outs.join(", "));
        let _ = writeln!(
            out,
            "    {lhs}tape.segment(\"{}\", {keep}, &[{}], move |t| {{",
            seg.name,
            ins.join(", ")
        );
        for (k, name) in ins.iter().enumerate() {
            let _ = writeln!(out, "        let {name} = &t[{k}];");
        }
        let inputs: BTreeSet<Vid> = seg.inputs.iter().copied().collect();
        for op in &seg.ops {
            let arg = |o: &Operand| match o {
                Operand::Value(v) if inputs.contains(v) => self.var(*v).to_string(),
                Operand::Value(v) => format!("&{}", self.var(*v)),
                Operand::Param(p) => self
                    .params
                    .iter()
                    .find(|(q, _)| q == p)
                    .map_or_else(|| "missing".into(), |(_, v)| v.clone()),
            };
            let split = op
                .split
                .as_ref()
                .map_or(String::new(), |s| format!(", split {s}"));
            let _ = writeln!(
                out,
                "        // {}: {} [{}]{split}",
                op.traced,
                op.kind.name(),
                op.annotation
            );
            let call = self.op_call(op, &arg)?;
            match op.outputs.as_slice() {
                [one] => {
                    let _ = writeln!(out, "        let {} = {call};", self.var(*one));
                }
                many => {
                    let names: Vec<&str> = many.iter().map(|&v| self.var(v)).collect();
                    let _ = writeln!(out, "        let [{}] = {call};", names.join(", "));
                }
            }
        }
        let _ = writeln!(out, "        Ok(vec![{}])", outs.join(", "));
        let _ = writeln!(out, "    }})?)?;");
        Ok(())
    }

    /// The block as a function that records it on a tape.
    fn function(&self, out: &mut String) -> Result<(), CodegenError> {
        let b = self.block;
        let (fname, doc) = match b.kind {
            BlockKind::Embed => ("embed", "The embedding: token ids to the stream."),
            BlockKind::Layer => (
                "layer",
                "Transformer layer `i`: every layer of the model runs this block with its own weights.",
            ),
            BlockKind::Head => (
                "head",
                "The head: the stream to this micro-batch's share of the loss.",
            ),
        };
        let mut args = vec![
            "w: &'a Weights".to_string(),
            "tape: &mut Tape<'a>".to_string(),
            format!(
                "{}tp: &'a dyn Communicator",
                if self.uses_tp() { "" } else { "_" }
            ),
            format!("{}tp_rank: i64", if self.uses_tp_rank() { "" } else { "_" }),
        ];
        if b.kind == BlockKind::Layer {
            args.push("i: u32".into());
        }
        for (k, _) in b.inputs.iter().enumerate() {
            args.push(format!("{}: ValueId", self.var(Vid(k as u32))));
        }
        if b.kind == BlockKind::Layer {
            args.push("keeps: Keeps".into());
        }
        if self.uses_total_tokens() {
            args.push("total_tokens: i64".into());
        }
        let _ = writeln!(out, "\n/// {doc}");
        let _ = writeln!(out, "#[allow(clippy::too_many_arguments)]");
        let _ = writeln!(
            out,
            "pub fn {fname}<'a>({}) -> Result<ValueId, ExecError> {{",
            args.join(", ")
        );
        for (pattern, var) in &self.params {
            let name = if pattern.contains('*') {
                format!("&format!(\"{}\")", pattern.replacen('*', "{i}", 1))
            } else {
                format!("\"{pattern}\"")
            };
            let _ = writeln!(out, "    let {var} = w.get({name})?;");
        }
        for step in &b.steps {
            match step {
                Step::Segment(seg) => {
                    let keep = match (b.kind, seg.attention_core) {
                        (BlockKind::Layer, true) => "keeps.core",
                        (BlockKind::Layer, false) => "keeps.body",
                        _ => "Keep::Activations",
                    };
                    self.segment(seg, keep, out)?;
                }
                Step::Adapter {
                    kind,
                    input,
                    output,
                } => {
                    let _ = writeln!(
                        out,
                        "    let {} = tape.adapt({}, tp, {})?;",
                        self.var(*output),
                        adapter_expr(*kind),
                        self.var(*input)
                    );
                }
            }
        }
        let _ = writeln!(out, "    Ok({})\n}}", self.var(b.output));
        Ok(())
    }
}

fn init_expr(init: ParamInit) -> String {
    match init {
        ParamInit::Normal { std } => format!("Init::Normal {{ std: {} }}", f64_lit(std)),
        ParamInit::Ones => "Init::Ones".into(),
        ParamInit::Zeros => "Init::Zeros".into(),
    }
}

fn spec_line(p: &ParamDecl, name_expr: &str) -> String {
    let shape: Vec<String> = p.shape.iter().map(u64::to_string).collect();
    let tp_dim = p
        .tp_dim
        .map_or_else(|| "None".into(), |d| format!("Some({d})"));
    let grad = if p.tp_grad_partial {
        "TpGrad::Partial"
    } else {
        "TpGrad::Complete"
    };
    format!(
        "        spec({name_expr}, &[{}], {}, {tp_dim}, {grad}),",
        shape.join(", "),
        init_expr(p.init)
    )
}

fn params_fn(program: &ExecProgram, kind: BlockKind, out: &mut String) {
    let (fname, doc, arg) = match kind {
        BlockKind::Embed => ("embed_params", "Parameters of the embedding block.", ""),
        BlockKind::Layer => (
            "layer_params",
            "Parameters of transformer layer `i`.",
            "i: u32",
        ),
        BlockKind::Head => ("head_params", "Parameters of the head block.", ""),
    };
    let _ = writeln!(
        out,
        "\n/// {doc}\npub fn {fname}({arg}) -> Vec<ParamSpec> {{\n    vec!["
    );
    let mut seen = BTreeSet::new();
    for p in program.params.iter().filter(|p| p.block == kind) {
        if !seen.insert(p.pattern.clone()) {
            continue;
        }
        let name = if p.pattern.contains('*') {
            format!("format!(\"{}\")", p.pattern.replacen('*', "{i}", 1))
        } else {
            format!("\"{}\".to_string()", p.pattern)
        };
        let _ = writeln!(out, "{}", spec_line(p, &name));
    }
    let _ = writeln!(out, "    ]\n}}");
}

static NO_CUSTOM_OPS: BTreeMap<String, CustomOpImpl> = BTreeMap::new();

fn blocks_rs(program: &ExecProgram, options: &CodegenOptions) -> Result<String, CodegenError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "//! The blocks of {} under this plan (tp {}): the embedding, one transformer\n//! layer (every layer runs it with its own weights) and the head, as\n//! segments of local ops and the adapters between them. Generated by\n//! autopart from the lowered program (`program.txt`); do not edit.\n",
        program.model, program.tp
    );
    let _ = writeln!(out, "use std::collections::HashMap;\n");
    let _ = writeln!(out, "use autopart_runtime::comm::Communicator;");
    let has_adapters = program
        .blocks()
        .iter()
        .any(|b| b.adapters().next().is_some());
    let has_attention = program
        .blocks()
        .iter()
        .any(|b| b.ops().any(|op| op.kind == OpKind::Attention));
    let _ = writeln!(
        out,
        "use autopart_runtime::exec::{{\n    {}ExecError, Init, Keep, Param, ParamSpec, Tape, TpGrad, ValueId,\n}};",
        if has_adapters { "Adapter, " } else { "" }
    );
    let _ = writeln!(
        out,
        "use autopart_runtime::ops::{};",
        if has_attention {
            "{self, Mask}"
        } else {
            "self"
        }
    );
    let _ = writeln!(out, "use tch::Tensor;");
    out.push_str(
        r#"
/// What layer segments keep for backward: `body` for every segment, `core`
/// for the attention core (selective recompute reruns only the core).
#[derive(Clone, Copy, Debug)]
pub struct Keeps {
    pub body: Keep,
    pub core: Keep,
}

/// This rank's parameter shards, by name.
#[derive(Debug)]
pub struct Weights {
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl Weights {
    /// Initialises every parameter of `specs` from `seed` (the same values
    /// under every plan) and keeps this tp rank's shard.
    pub fn new(
        specs: Vec<ParamSpec>,
        seed: u64,
        tp_rank: usize,
        tp: usize,
    ) -> Result<Self, ExecError> {
        let params = specs
            .iter()
            .map(|s| s.materialise(seed, tp_rank, tp))
            .collect::<Result<Vec<_>, _>>()?;
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.spec.name.clone(), i))
            .collect();
        Ok(Self { params, index })
    }

    pub fn get(&self, name: &str) -> Result<&Tensor, ExecError> {
        self.index
            .get(name)
            .map(|&i| &self.params[i].tensor)
            .ok_or_else(|| ExecError::Plan(format!("parameter {name} is not on this stage")))
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }
}

fn spec(name: String, shape: &[i64], init: Init, tp_dim: Option<i64>, tp_grad: TpGrad) -> ParamSpec {
    ParamSpec {
        name,
        shape: shape.to_vec(),
        init,
        tp_dim,
        tp_grad,
    }
}

/// A segment's outputs as an array.
fn outputs<const N: usize>(ids: Vec<ValueId>) -> Result<[ValueId; N], ExecError> {
    let n = ids.len();
    ids.try_into()
        .map_err(|_| ExecError::Plan(format!("a segment returned {n} values, expected {N}")))
}
"#,
    );
    for kind in [BlockKind::Embed, BlockKind::Layer, BlockKind::Head] {
        params_fn(program, kind, &mut out);
    }
    for block in program.blocks() {
        BlockGen::new(block, &options.custom_ops).function(&mut out)?;
    }
    Ok(out)
}

fn keeps_expr(recompute: Recompute) -> &'static str {
    match recompute {
        Recompute::None => "Keeps {\n    body: Keep::Activations,\n    core: Keep::Activations,\n}",
        Recompute::Selective => "Keeps {\n    body: Keep::Activations,\n    core: Keep::Inputs,\n}",
        Recompute::Full => "Keeps {\n    body: Keep::Inputs,\n    core: Keep::Inputs,\n}",
    }
}

fn block_call(program: &ExecProgram, kind: BlockKind, args: &[&str]) -> String {
    let block = match kind {
        BlockKind::Embed => &program.embed,
        BlockKind::Layer => &program.layer,
        BlockKind::Head => &program.head,
    };
    let g = BlockGen::new(block, &NO_CUSTOM_OPS);
    let name = match kind {
        BlockKind::Embed => "embed",
        BlockKind::Layer => "layer",
        BlockKind::Head => "head",
    };
    let mut all = vec!["&self.w", "tape", "tp", "self.tp_rank"];
    all.extend_from_slice(args);
    if g.uses_total_tokens() {
        all.push("total_tokens");
    }
    format!("blocks::{name}({})?", all.join(", "))
}

fn stage_rs(program: &ExecProgram, stage: &StageProgram) -> String {
    let k = stage.index;
    let n_chunks = stage.chunks.len();
    let mut out = String::new();
    let ranges: Vec<String> = stage
        .chunks
        .iter()
        .map(|(a, b)| format!("layers {a}..{b}"))
        .collect();
    let _ = writeln!(
        out,
        "//! Pipeline stage {k} of {}: {}{}{}; recompute {}.\n//! Generated by autopart; do not edit.\n",
        program.pp,
        if stage.embedding {
            "the embedding, "
        } else {
            ""
        },
        ranges.join(" and "),
        if stage.head {
            ", the head and the loss"
        } else {
            ""
        },
        stage.recompute
    );
    let _ = writeln!(out, "use autopart_runtime::comm::Communicator;");
    let _ = writeln!(
        out,
        "use autopart_runtime::exec::{{ExecError, Keep, Param, Tape, ValueId}};"
    );
    let _ = writeln!(out, "use autopart_runtime::program::StageModule;");
    let _ = writeln!(out, "use tch::Tensor;\n");
    let _ = writeln!(out, "use crate::blocks::{{self, Keeps, Weights}};\n");
    let _ = writeln!(
        out,
        "const KEEPS: {};\n",
        keeps_expr(stage.recompute).replacen("Keeps {", "Keeps = Keeps {", 1)
    );
    let _ = writeln!(
        out,
        "/// This rank's part of stage {k}: its parameter shards.\n#[derive(Debug)]\npub struct Stage {{\n    w: Weights,\n    tp_rank: i64,\n}}\n"
    );
    let _ = writeln!(out, "impl Stage {{");
    let _ = writeln!(
        out,
        "    pub fn new(tp_rank: usize, tp: usize, seed: u64) -> Result<Self, ExecError> {{"
    );
    let _ = writeln!(out, "        let mut specs = Vec::new();");
    if stage.embedding {
        let _ = writeln!(out, "        specs.extend(blocks::embed_params());");
    }
    for (a, b) in &stage.chunks {
        let _ = writeln!(
            out,
            "        for i in {a}..{b} {{\n            specs.extend(blocks::layer_params(i));\n        }}"
        );
    }
    if stage.head {
        let _ = writeln!(out, "        specs.extend(blocks::head_params());");
    }
    let _ = writeln!(
        out,
        "        Ok(Self {{\n            w: Weights::new(specs, seed, tp_rank, tp)?,\n            tp_rank: tp_rank as i64,\n        }})\n    }}\n}}\n"
    );

    let _ = writeln!(out, "impl StageModule for Stage {{");
    let _ = writeln!(
        out,
        "    fn params(&self) -> &[Param] {{\n        self.w.params()\n    }}\n"
    );
    let _ = writeln!(
        out,
        "    fn params_mut(&mut self) -> &mut [Param] {{\n        self.w.params_mut()\n    }}\n"
    );
    let _ = writeln!(
        out,
        "    fn n_chunks(&self) -> usize {{\n        {n_chunks}\n    }}\n"
    );
    let any_first = stage.embedding;
    let any_received = !(stage.embedding && n_chunks == 1);
    let any_last = stage.head;
    let head_total = BlockGen::new(&program.head, &NO_CUSTOM_OPS).uses_total_tokens();
    let used = |name: &str, yes: bool| {
        if yes {
            name.to_string()
        } else {
            format!("_{name}")
        }
    };
    let _ = writeln!(out, "    #[allow(clippy::too_many_arguments)]");
    let _ = writeln!(
        out,
        "    fn forward<'a>(\n        &'a self,\n        tape: &mut Tape<'a>,\n        tp: &'a dyn Communicator,\n        chunk: usize,\n        {}: Option<Tensor>,\n        {}: &Tensor,\n        {}: &Tensor,\n        {}: i64,\n    ) -> Result<(Option<ValueId>, ValueId), ExecError> {{",
        used("input", any_received),
        used("tokens", any_first),
        used("labels", any_last),
        used("total_tokens", any_last && head_total)
    );
    let _ = writeln!(out, "        match chunk {{");
    for (c, (a, b)) in stage.chunks.iter().enumerate() {
        let first = stage.embedding && c == 0;
        let last = stage.head && c + 1 == n_chunks;
        let _ = writeln!(out, "            {c} => {{");
        if first {
            let _ = writeln!(out, "                let tokens = tape.input(tokens);");
            let _ = writeln!(
                out,
                "                let mut x = {};",
                block_call(program, BlockKind::Embed, &["tokens"])
            );
            let _ = writeln!(out, "                let entry = None;");
        } else {
            let _ = writeln!(
                out,
                "                let received = input.ok_or_else(|| {{\n                    ExecError::Pipeline(\"stage {k} chunk {c}: forward before its activation arrived\".into())\n                }})?;"
            );
            let _ = writeln!(out, "                let mut x = tape.input(&received);");
            let _ = writeln!(out, "                let entry = Some(x);");
        }
        let _ = writeln!(
            out,
            "                for i in {a}..{b} {{\n                    x = {};\n                }}",
            block_call(program, BlockKind::Layer, &["i", "x", "KEEPS"])
        );
        if last {
            let _ = writeln!(out, "                let labels = tape.input(labels);");
            let _ = writeln!(
                out,
                "                let loss = {};",
                block_call(program, BlockKind::Head, &["x", "labels"])
            );
            let _ = writeln!(out, "                Ok((entry, loss))");
        } else {
            let _ = writeln!(out, "                Ok((entry, x))");
        }
        let _ = writeln!(out, "            }}");
    }
    let _ = writeln!(
        out,
        "            _ => Err(ExecError::Pipeline(format!(\n                \"model chunk {{chunk}} is not on stage {k}\"\n            ))),"
    );
    let _ = writeln!(out, "        }}\n    }}\n");
    // The stream's shape: dim 0 is the micro-batch, dim 1 the sequence.
    let dims: Vec<String> = program
        .stream_shape
        .iter()
        .enumerate()
        .map(|(d, &len)| {
            let split = program.stream_state.fwd == Layout::D(d);
            let div = if split {
                format!(" / {}", program.tp)
            } else {
                String::new()
            };
            match d {
                0 => format!("mbs{div}"),
                1 => format!("seq{div}"),
                _ => len.to_string(),
            }
        })
        .collect();
    let _ = writeln!(
        out,
        "    fn boundary_shape(&self, mbs: i64, seq: i64) -> Vec<i64> {{\n        vec![{}]\n    }}\n",
        dims.join(", ")
    );
    let _ = writeln!(
        out,
        "    fn loss_is_partial(&self) -> bool {{\n        {}\n    }}\n",
        program.loss_is_partial()
    );
    let _ = writeln!(
        out,
        "    fn fusable(&self, {}) -> bool {{\n        {}\n    }}",
        if stage.recompute == Recompute::None {
            "tp_size: usize"
        } else {
            "_tp_size: usize"
        },
        if stage.recompute == Recompute::None {
            "tp_size == 1"
        } else {
            "false"
        }
    );
    let _ = writeln!(out, "}}");
    out
}

fn schedule_expr(s: Schedule) -> String {
    match s {
        Schedule::GPipe => "Schedule::GPipe".into(),
        Schedule::OneFOneB => "Schedule::OneFOneB".into(),
        Schedule::Interleaved { chunks } => format!("Schedule::Interleaved {{ chunks: {chunks} }}"),
    }
}

/// The runtime's name of the plan's ZeRO stage.
fn zero_expr(zero: ZeroStage) -> &'static str {
    match zero {
        ZeroStage::Off => "ZeroStage::Off",
        ZeroStage::One => "ZeroStage::One",
        ZeroStage::Two => "ZeroStage::Two",
        ZeroStage::Three => "ZeroStage::Three",
    }
}

fn main_rs(program: &ExecProgram) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "//! {} on {} GPUs (tp {}, pp {}, dp {}; {} at run time), generated by\n//! autopart from plan.ron. Run it with `mpirun -np {} autopart run OUT`.\n",
        program.model,
        program.plan_gpus,
        program.tp,
        program.pp,
        program.dp,
        program.runtime_gpus,
        program.runtime_gpus
    );
    let _ = writeln!(out, "mod blocks;");
    for s in &program.stages {
        let _ = writeln!(out, "mod stage_{};", s.index);
    }
    let _ = writeln!(out, "\nuse std::process::ExitCode;\n");
    let _ = writeln!(
        out,
        "use autopart_runtime::app::{{self, BuiltStage, PlanMeta, Schedule, StageCtx, ZeroStage}};"
    );
    let _ = writeln!(out, "use autopart_runtime::exec::ExecError;\n");
    let replicas = program
        .runtime_gpus
        .checked_div(program.plan_gpus)
        .unwrap_or(1)
        .max(1);
    let zero = zero_expr(program.zero);
    let peaks: Vec<String> = program
        .stages
        .iter()
        .map(|s| s.predicted_peak_bytes.to_string())
        .collect();
    let _ = writeln!(
        out,
        "const PLAN: PlanMeta = PlanMeta {{\n    model: \"{}\",\n    vocab: {},\n    seq_len: {},\n    global_batch: {},\n    micro_batch: {},\n    micro_batches: {},\n    tp: {},\n    pp: {},\n    dp: {},\n    plan_gpus: {},\n    runtime_gpus: {},\n    schedule: {},\n    zero: {},\n    predicted_peak_bytes: &[{}],\n    predicted_step_s: {},\n}};\n",
        program.model,
        program.vocab,
        program.seq_len,
        program.global_batch / u64::from(replicas),
        program.micro_batch,
        program.micro_batches,
        program.tp,
        program.pp,
        program.dp,
        program.plan_gpus,
        program.runtime_gpus,
        schedule_expr(program.schedule),
        zero,
        peaks.join(", "),
        f64_lit(program.predicted_step_s)
    );
    let _ = writeln!(
        out,
        "/// This rank's part of the model: its pipeline stage, sharded over tp.\nfn build_stage(ctx: StageCtx) -> BuiltStage {{\n    let (tp_rank, tp, seed) = (ctx.coord.tp, ctx.mesh.tp, ctx.seed);\n    match ctx.coord.pp {{"
    );
    for s in &program.stages {
        let _ = writeln!(
            out,
            "        {} => Ok(Box::new(stage_{}::Stage::new(tp_rank, tp, seed)?)),",
            s.index, s.index
        );
    }
    let _ = writeln!(
        out,
        "        stage => Err(ExecError::Plan(format!(\n            \"pipeline stage {{stage}} is not in this plan of {} stages\"\n        ))),\n    }}\n}}\n",
        program.pp
    );
    let _ = writeln!(
        out,
        "fn main() -> ExitCode {{\n    app::main(&PLAN, build_stage)\n}}"
    );
    out
}

fn cargo_toml(name: &str, options: &CodegenOptions) -> String {
    let runtime = options
        .runtime_path
        .display()
        .to_string()
        .replace('\\', "/");
    let mut custom = String::new();
    let mut seen = BTreeSet::new();
    for imp in options.custom_ops.values() {
        if !seen.insert(imp.crate_name.clone()) {
            continue;
        }
        let dep = match &imp.crate_dir {
            Some(dir) => format!(
                "{{ path = \"{}\" }}",
                dir.display().to_string().replace('\\', "/")
            ),
            None => "\"*\"".to_string(),
        };
        custom.push_str(&format!("# Custom ops.\n{} = {dep}\n", imp.crate_name));
    }
    format!(
        r#"# Generated by autopart; do not edit.
[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false
build = "build.rs"

[dependencies]
autopart-runtime = {{ path = "{runtime}" }}
tch = "0.24"
# Direct, so that build.rs sees DEP_TCH_LIBTORCH_LIB (torch-sys has `links = "tch"`).
torch-sys = "0.24"
{custom}
# Its own workspace, even when OUT lies inside another one.
[workspace]

# As the autopart workspace, so that a shared target folder reuses its builds.
[profile.dev.package."*"]
opt-level = 2
"#
    )
}

const BUILD_RS: &str = r#"//! Embeds an rpath to libtorch so that the plan binary runs without
//! LD_LIBRARY_PATH. Generated by autopart; do not edit.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
"#;

/// Formats Rust source with rustfmt (edition 2024) when it is on PATH;
/// returns the text unchanged otherwise.
fn rustfmt(text: String) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("rustfmt")
        .args(["--edition", "2024", "--emit", "stdout", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        tracing::warn!("rustfmt is not on PATH: the generated code is not formatted");
        return text;
    };
    if let Some(mut stdin) = child.stdin.take()
        && stdin.write_all(text.as_bytes()).is_err()
    {
        return text;
    }
    match child.wait_with_output() {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => {
            String::from_utf8(out.stdout).unwrap_or(text)
        }
        _ => {
            tracing::warn!("rustfmt failed on generated code; left unformatted");
            text
        }
    }
}

/// Every file of the generated crate, and its package name.
pub fn generate_files(
    program: &ExecProgram,
    options: &CodegenOptions,
) -> Result<(String, Vec<GeneratedFile>), CodegenError> {
    if program.params.iter().any(|p| p.init == ParamInit::Zeros) {
        // Supported by the runtime's Init::Zeros.
    }
    let mut files = vec![
        GeneratedFile {
            path: "src/main.rs".into(),
            text: rustfmt(main_rs(program)),
        },
        GeneratedFile {
            path: "src/blocks.rs".into(),
            text: rustfmt(blocks_rs(program, options)?),
        },
    ];
    for s in &program.stages {
        files.push(GeneratedFile {
            path: format!("src/stage_{}.rs", s.index),
            text: rustfmt(stage_rs(program, s)),
        });
    }
    files.push(GeneratedFile {
        path: "build.rs".into(),
        text: BUILD_RS.to_string(),
    });
    // The name hashes the sources, not Cargo.toml (which holds a local path).
    let name = package_name(program, &files);
    files.insert(
        0,
        GeneratedFile {
            path: "Cargo.toml".into(),
            text: cargo_toml(&name, options),
        },
    );
    Ok((name, files))
}

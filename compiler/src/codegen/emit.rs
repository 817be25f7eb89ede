//! The generated files' text.

use std::collections::{BTreeMap, BTreeSet};

use super::writer::{Expr, Stmt, Writer, use_list};
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
    "ew",
    "lw",
    "hw",
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

/// What a generated file starts with: it is generated, from which plan, by
/// which autopart.
fn header(options: &CodegenOptions, comment: &str) -> String {
    format!(
        "{comment} @generated by autopart {} from plan.ron (plan hash {}); do not edit.\n",
        env!("CARGO_PKG_VERSION"),
        options.plan_hash
    )
}

/// `text` for a `//!` line: control characters (a newline in a model's
/// folder name) become spaces.
fn doc_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The block's name in generated code, and its weights struct.
fn block_names(kind: BlockKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        BlockKind::Embed => ("embed", "EmbedWeights", "ew"),
        BlockKind::Layer => ("layer", "LayerWeights", "lw"),
        BlockKind::Head => ("head", "HeadWeights", "hw"),
    }
}

fn block_of(program: &ExecProgram, kind: BlockKind) -> &Block {
    match kind {
        BlockKind::Embed => &program.embed,
        BlockKind::Layer => &program.layer,
        BlockKind::Head => &program.head,
    }
}

/// A Rust expression for the full name of parameter `pattern` (the layer
/// index `i` in place of `*`), as a `&str`.
fn name_ref(pattern: &str) -> Expr {
    if pattern.contains('*') {
        Expr::call(
            "&format!",
            vec![Expr::atom(format!(
                "\"{}\"",
                pattern.replacen('*', "{i}", 1)
            ))],
        )
    } else {
        Expr::atom(format!("\"{pattern}\""))
    }
}

struct BlockGen<'a> {
    custom: &'a BTreeMap<String, CustomOpImpl>,
    block: &'a Block,
    /// Each parameter the block reads (its pattern) and its Rust variable.
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

    /// The variable of value `v`, which `user` reads or makes.
    fn var(&self, v: Vid, user: &str) -> Result<&str, CodegenError> {
        self.vars
            .get(v.index())
            .map(String::as_str)
            .ok_or_else(|| CodegenError::UnknownValue {
                block: format!("{:?}", self.block.kind).to_lowercase(),
                user: user.to_string(),
                value: v.0,
            })
    }

    /// The variable of parameter `pattern`, which op `op` reads.
    fn param(&self, pattern: &str, op: &LocalOp) -> Result<&str, CodegenError> {
        self.params
            .iter()
            .find(|(q, _)| q == pattern)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| CodegenError::UnknownParam {
                op: op.traced.clone(),
                param: pattern.to_string(),
            })
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

    /// The call of `op` on its operands (Rust expressions, in order).
    fn op_call(&self, op: &LocalOp, args: &[String]) -> Result<Expr, CodegenError> {
        let a = |i: usize| -> Result<Expr, CodegenError> {
            args.get(i)
                .map(|s| Expr::atom(s.clone()))
                .ok_or_else(|| CodegenError::MissingInput {
                    op: op.traced.clone(),
                    kind: op.kind.name().to_string(),
                    index: i,
                    inputs: args.len(),
                })
        };
        let offset = || {
            Expr::atom(
                op.offset_unit
                    .map_or_else(|| "0".to_string(), |u| format!("tp_rank * {u}")),
            )
        };
        // The traced op carries every attribute its implementation takes;
        // codegen never fills one in.
        let missing = |name: &str, what: &str| {
            CodegenError::Unsupported(format!(
                "{}: {} has no {what} attribute '{name}'",
                op.traced,
                op.kind.name()
            ))
        };
        let attr_f = |name: &str| -> Result<Expr, CodegenError> {
            op.attrs
                .get(name)
                .and_then(AttrValue::as_float)
                .map(|v| Expr::atom(f64_lit(v)))
                .ok_or_else(|| missing(name, "float"))
        };
        let lit_f = |name: &str| -> Result<String, CodegenError> {
            op.attrs
                .get(name)
                .and_then(AttrValue::as_float)
                .map(f64_lit)
                .ok_or_else(|| missing(name, "float"))
        };
        let attr_i = |name: &str| op.attrs.get(name).and_then(AttrValue::as_int);
        let ops = |name: &str, args: Vec<Expr>| Expr::call(format!("ops::{name}"), args).try_();
        Ok(match &op.kind {
            OpKind::Embedding => ops("embedding", vec![a(0)?, a(1)?, offset()]),
            OpKind::PosEmbedding => {
                let Expr::Atom(ids) = a(0)? else {
                    unreachable!("operands are atoms")
                };
                let positions = Expr::call(
                    "&ops::positions",
                    vec![
                        Expr::atom(format!("{ids}.size()[0]")),
                        Expr::atom(format!("{ids}.size()[1]")),
                        Expr::atom("0"),
                    ],
                )
                .try_();
                ops("pos_embedding", vec![positions, a(1)?, offset()])
            }
            OpKind::Linear => ops("linear", vec![a(0)?, a(1)?]),
            OpKind::LinearBias => ops("linear_bias", vec![a(0)?, a(1)?, a(2)?]),
            OpKind::RmsNorm => ops("rms_norm", vec![a(0)?, a(1)?, attr_f("eps")?]),
            OpKind::LayerNorm => ops("layer_norm", vec![a(0)?, a(1)?, a(2)?, attr_f("eps")?]),
            OpKind::SplitHeads => {
                let h = attr_i("h").ok_or_else(|| {
                    CodegenError::Unsupported(format!("{}: split_heads without h", op.traced))
                })?;
                ops("split_heads", vec![a(0)?, Expr::atom(h.to_string())])
            }
            OpKind::MergeHeads => ops("merge_heads", vec![a(0)?]),
            OpKind::Rope => match op.attrs.get("rope_type").and_then(AttrValue::as_str) {
                None => ops("rope", vec![a(0)?, attr_f("theta")?, offset()]),
                Some("linear") => {
                    let scaling = format!(
                        "&ops::RopeScaling::Linear {{ factor: {} }}",
                        lit_f("factor")?
                    );
                    ops(
                        "rope_scaled",
                        vec![a(0)?, attr_f("theta")?, Expr::atom(scaling), offset()],
                    )
                }
                Some("llama3") => {
                    let orig = attr_i("original_max_positions")
                        .ok_or_else(|| missing("original_max_positions", "int"))?;
                    let scaling = format!(
                        "&ops::RopeScaling::Llama3 {{ factor: {}, low_freq_factor: {}, high_freq_factor: {}, original_max_positions: {orig} }}",
                        lit_f("factor")?,
                        lit_f("low_freq_factor")?,
                        lit_f("high_freq_factor")?,
                    );
                    ops(
                        "rope_scaled",
                        vec![a(0)?, attr_f("theta")?, Expr::atom(scaling), offset()],
                    )
                }
                Some(other) => {
                    return Err(CodegenError::Unsupported(format!(
                        "{}: rope_type {other:?} has no runtime op",
                        op.traced
                    )));
                }
            },
            OpKind::Attention => {
                let causal = op
                    .attrs
                    .get("causal")
                    .and_then(AttrValue::as_bool)
                    .ok_or_else(|| missing("causal", "bool"))?;
                let mask = if causal { "Mask::Causal" } else { "Mask::Full" };
                ops("attention", vec![a(0)?, a(1)?, a(2)?, Expr::atom(mask)])
            }
            OpKind::Add => ops("add", vec![a(0)?, a(1)?]),
            OpKind::SwiGlu => ops("swiglu", vec![a(0)?, a(1)?]),
            OpKind::Gelu => ops("gelu", vec![a(0)?]),
            OpKind::CrossEntropy => ops("cross_entropy", vec![a(0)?, a(1)?]),
            OpKind::Mean => ops("mean", vec![a(0)?, Expr::atom("total_tokens")]),
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
                let mut call_args = (0..op.inputs.len()).map(a).collect::<Result<Vec<_>, _>>()?;
                for spec in &imp.attrs {
                    call_args.push(Expr::atom(custom_attr(op, spec)?));
                }
                Expr::call(imp.path.clone(), call_args).try_()
            }
        })
    }

    fn segment(&self, seg: &Segment, keep: &str, w: &mut Writer) -> Result<(), CodegenError> {
        let user = format!("segment {}", seg.name);
        let ins = seg
            .inputs
            .iter()
            .map(|&v| self.var(v, &user))
            .collect::<Result<Vec<_>, _>>()?;
        let outs = seg
            .outputs
            .iter()
            .map(|&v| self.var(v, &user))
            .collect::<Result<Vec<_>, _>>()?;
        let mut body = Vec::new();
        for (k, name) in ins.iter().enumerate() {
            body.push(Stmt::let_(name, Expr::atom(format!("&t[{k}]"))));
        }
        let inputs: BTreeSet<Vid> = seg.inputs.iter().copied().collect();
        for op in &seg.ops {
            let args = op
                .inputs
                .iter()
                .map(|o| match o {
                    Operand::Value(v) if inputs.contains(v) => {
                        self.var(*v, &op.traced).map(str::to_string)
                    }
                    Operand::Value(v) => self.var(*v, &op.traced).map(|s| format!("&{s}")),
                    Operand::Param(p) => self.param(p, op).map(str::to_string),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let split = op
                .split
                .as_ref()
                .map_or(String::new(), |s| format!(", split {s}"));
            body.push(Stmt::comment(format!(
                "{}: {} [{}]{split}",
                op.traced,
                op.kind.name(),
                op.annotation
            )));
            let call = self.op_call(op, &args)?;
            let names = op
                .outputs
                .iter()
                .map(|&v| self.var(v, &op.traced))
                .collect::<Result<Vec<_>, _>>()?;
            let pat = match names.as_slice() {
                [one] => one.to_string(),
                many => format!("[{}]", many.join(", ")),
            };
            body.push(Stmt::let_(&pat, call));
        }
        body.push(Stmt::Expr(
            Expr::atom(format!("Ok(vec![{}])", outs.join(", "))),
            "",
        ));
        let segment = Expr::method(
            "tape.segment",
            vec![
                Expr::atom(format!("\"{}\"", seg.name)),
                Expr::atom(keep),
                Expr::atom(format!("&[{}]", ins.join(", "))),
                Expr::Closure {
                    head: "move |t|".into(),
                    body,
                },
            ],
        )
        .try_();
        w.blank();
        w.stmt(&Stmt::let_(
            &format!("[{}]", outs.join(", ")),
            Expr::call("outputs", vec![segment]).try_(),
        ));
        Ok(())
    }

    /// The struct of the parameters the block reads (their places in the
    /// stage's `Weights`) and how it finds them by name.
    fn weights_struct(&self, w: &mut Writer) {
        let (_, ty, _) = block_names(self.block.kind);
        let doc = match self.block.kind {
            BlockKind::Embed => "The embedding's parameters",
            BlockKind::Layer => "The parameters of one transformer layer",
            BlockKind::Head => "The head's parameters",
        };
        w.blank();
        w.line(format!("/// {doc}: their places in the stage's"));
        w.line("/// `Weights`, found once when the stage is built.");
        w.line("#[derive(Clone, Copy, Debug)]");
        if self.params.is_empty() {
            w.line(format!("pub struct {ty} {{}}"));
        } else {
            w.open(format!("pub struct {ty}"));
            for (_, var) in &self.params {
                w.line(format!("{var}: usize,"));
            }
            w.close();
        }
        w.blank();
        w.open(format!("impl {ty}"));
        let (arg, what) = if self.block.kind == BlockKind::Layer {
            let i = if self.params.is_empty() { "_i" } else { "i" };
            (format!(", {i}: u32"), "transformer layer `i`'s parameters")
        } else {
            (String::new(), "the parameters")
        };
        w.line(format!("/// Finds {what} in `w`."));
        let wname = if self.params.is_empty() { "_w" } else { "w" };
        w.open(format!(
            "pub fn bind({wname}: &Weights{arg}) -> Result<Self, ExecError>"
        ));
        for (pattern, var) in &self.params {
            let find = Expr::method("w.find", vec![name_ref(pattern)]).try_();
            w.stmt(&Stmt::let_(var, find));
        }
        let fields: Vec<&str> = self.params.iter().map(|(_, v)| v.as_str()).collect();
        w.lines(&struct_literal("Ok(Self", &fields, ")"));
        w.close();
        if self.block.kind == BlockKind::Layer {
            w.blank();
            w.line("/// The places of the layer's parameters (its block's, for ZeRO-2/3).");
            w.open("pub fn places(&self) -> Vec<usize>");
            let places = self
                .params
                .iter()
                .map(|(_, v)| Expr::atom(format!("self.{v}")))
                .collect();
            w.stmt(&Stmt::Expr(Expr::square("vec!", places), ""));
            w.close();
        }
        w.close();
    }

    /// The block as a function that records it on a tape.
    fn function(&self, w: &mut Writer) -> Result<(), CodegenError> {
        let b = self.block;
        let (fname, ty, bound) = block_names(b.kind);
        let doc = match b.kind {
            BlockKind::Embed => "The embedding: token ids to the stream.",
            BlockKind::Layer => {
                "A transformer layer: every layer of the model runs this block with its own weights (`lw`)."
            }
            BlockKind::Head => "The head: the stream to this micro-batch's share of the loss.",
        };
        let mut args = vec![
            "w: &'a Weights".to_string(),
            format!(
                "{}{bound}: &{ty}",
                if self.params.is_empty() { "_" } else { "" }
            ),
            "tape: &mut Tape<'a>".to_string(),
            format!(
                "{}tp: &'a dyn Communicator",
                if self.uses_tp() { "" } else { "_" }
            ),
            format!("{}tp_rank: i64", if self.uses_tp_rank() { "" } else { "_" }),
        ];
        for (k, _) in b.inputs.iter().enumerate() {
            let user = format!("{fname} block input {k}");
            args.push(format!("{}: ValueId", self.var(Vid(k as u32), &user)?));
        }
        if b.kind == BlockKind::Layer {
            args.push("keeps: Keeps".into());
        }
        if self.uses_total_tokens() {
            args.push("total_tokens: i64".into());
        }
        w.blank();
        w.line(format!("/// {doc}"));
        w.line("#[allow(clippy::too_many_arguments)]");
        fn_signature(
            w,
            &format!("pub fn {fname}<'a>"),
            &args,
            " -> Result<ValueId, ExecError>",
        );
        for (_, var) in &self.params {
            w.stmt(&Stmt::let_(
                var,
                Expr::method("w.tensor", vec![Expr::atom(format!("{bound}.{var}"))]),
            ));
        }
        for step in &b.steps {
            match step {
                Step::Segment(seg) => {
                    let keep = match (b.kind, seg.attention_core) {
                        (BlockKind::Layer, true) => "keeps.core",
                        (BlockKind::Layer, false) => "keeps.body",
                        _ => "Keep::Activations",
                    };
                    self.segment(seg, keep, w)?;
                }
                Step::Adapter {
                    kind,
                    input,
                    output,
                } => {
                    let user = format!("adapter {kind}");
                    let call = Expr::method(
                        "tape.adapt",
                        vec![
                            Expr::atom(adapter_expr(*kind)),
                            Expr::atom("tp"),
                            Expr::atom(self.var(*input, &user)?),
                        ],
                    )
                    .try_();
                    w.stmt(&Stmt::let_(self.var(*output, &user)?, call));
                }
            }
        }
        w.line(format!(
            "Ok({})",
            self.var(b.output, &format!("the {fname} block's output"))?
        ));
        w.close();
        Ok(())
    }
}

/// `open { a, b }close` with shorthand fields as rustfmt writes it: on one
/// line when the fields take at most `struct_lit_width` (18) columns, else
/// one a line.
fn struct_literal(open: &str, fields: &[&str], close: &str) -> String {
    let inner = fields.join(", ");
    if fields.is_empty() {
        format!("{open} {{}}{close}")
    } else if inner.len() <= 18 {
        format!("{open} {{ {inner} }}{close}")
    } else {
        let mut out = format!("{open} {{\n");
        for f in fields {
            out.push_str(&format!("    {f},\n"));
        }
        out.push_str(&format!("}}{close}"));
        out
    }
}

/// `head(args) ret {` as rustfmt writes it: on one line when it fits, else
/// one parameter a line; opens the body.
fn fn_signature(w: &mut Writer, head: &str, args: &[String], ret: &str) {
    let one = format!("{head}({}){ret}", args.join(", "));
    if w.indent() + one.len() + 2 <= super::writer::MAX_WIDTH {
        w.open(one);
    } else {
        w.line(format!("{head}("));
        for a in args {
            w.line(format!("    {a},"));
        }
        w.open(format!("){ret}"));
    }
}

fn init_expr(init: ParamInit) -> String {
    match init {
        ParamInit::Normal { std } => format!("Init::Normal {{ std: {} }}", f64_lit(std)),
        ParamInit::Ones => "Init::Ones".into(),
        ParamInit::Zeros => "Init::Zeros".into(),
    }
}

fn spec_expr(p: &ParamDecl, name: Expr) -> Expr {
    // The model's shape: the runtime holds a copied block once.
    let shape: Vec<String> = p.model_shape().iter().map(u64::to_string).collect();
    let tp_dim = p
        .tp_dim
        .map_or_else(|| "None".into(), |d| format!("Some({d})"));
    let grad = if p.copies > 1 {
        format!("TpGrad::Copies({})", p.copies)
    } else if p.tp_grad_partial {
        "TpGrad::Partial".into()
    } else {
        "TpGrad::Complete".into()
    };
    Expr::call(
        "spec",
        vec![
            name,
            Expr::Array {
                prefix: "&[".into(),
                items: shape,
            },
            Expr::atom(init_expr(p.init)),
            Expr::atom(tp_dim),
            Expr::atom(grad),
        ],
    )
}

/// The embedding's parameters the head reads too (tied weights), when
/// they sit on different stages (pp > 1); other ties across stages are
/// not supported.
fn head_tied(program: &ExecProgram) -> Result<Vec<&ParamDecl>, CodegenError> {
    if program.pp < 2 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for p in program.params.iter().filter(|p| !p.tied_blocks.is_empty()) {
        if p.block != BlockKind::Embed || p.tied_blocks != [BlockKind::Head] {
            return Err(CodegenError::Unsupported(format!(
                "parameter {} is tied between the {:?} block and {:?}; across pipeline stages only the embedding and the head may share a weight",
                p.name, p.block, p.tied_blocks
            )));
        }
        out.push(p);
    }
    Ok(out)
}

fn params_fn(program: &ExecProgram, kind: BlockKind, w: &mut Writer) {
    let (fname, doc, arg) = match kind {
        BlockKind::Embed => ("embed_params", "Parameters of the embedding block.", ""),
        BlockKind::Layer => (
            "layer_params",
            "Parameters of transformer layer `i`.",
            "i: u32",
        ),
        BlockKind::Head => ("head_params", "Parameters of the head block.", ""),
    };
    w.blank();
    w.line(format!("/// {doc}"));
    let mut seen = BTreeSet::new();
    let mut specs = Vec::new();
    for p in program.params.iter().filter(|p| p.block == kind) {
        if !seen.insert(p.pattern.clone()) {
            continue;
        }
        let name = if p.pattern.contains('*') {
            Expr::call(
                "format!",
                vec![Expr::atom(format!(
                    "\"{}\"",
                    p.pattern.replacen('*', "{i}", 1)
                ))],
            )
        } else {
            Expr::atom(format!("\"{}\".to_string()", p.pattern))
        };
        specs.push(spec_expr(p, name));
    }
    let arg = if specs.is_empty() && !arg.is_empty() {
        "_i: u32"
    } else {
        arg
    };
    w.open(format!("pub fn {fname}({arg}) -> Vec<ParamSpec>"));
    if specs.is_empty() {
        w.line("Vec::new()");
    } else {
        w.stmt(&Stmt::Expr(Expr::square("vec!", specs), ""));
    }
    w.close();
}

static NO_CUSTOM_OPS: BTreeMap<String, CustomOpImpl> = BTreeMap::new();

/// The fixed part of `blocks.rs`: `Keeps`, `Weights` and the helpers.
const BLOCKS_PRELUDE: &str = r#"
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

    /// The place of parameter `name` (for [`Weights::tensor`]).
    pub fn find(&self, name: &str) -> Result<usize, ExecError> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| ExecError::Plan(format!("parameter {name} is not on this stage")))
    }

    /// The parameter at `place` (from [`Weights::find`]).
    pub fn tensor(&self, place: usize) -> &Tensor {
        &self.params[place].tensor
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }
}

fn spec(
    name: String,
    shape: &[i64],
    init: Init,
    tp_dim: Option<i64>,
    tp_grad: TpGrad,
) -> ParamSpec {
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
"#;

fn blocks_rs(program: &ExecProgram, options: &CodegenOptions) -> Result<String, CodegenError> {
    check_params(program)?;
    let mut w = Writer::new();
    w.lines(&header(options, "//"));
    w.lines(&format!(
        "//! The blocks of {} under this plan (tp {}): the embedding, one transformer\n//! layer (every layer runs it with its own weights) and the head, as\n//! segments of local ops and the adapters between them. Generated by\n//! autopart from the lowered program (`program.txt`); do not edit.",
        doc_safe(&program.model),
        program.tp
    ));
    w.blank();
    w.line("use std::collections::HashMap;");
    w.blank();
    w.line("use autopart_runtime::comm::Communicator;");
    let has_adapters = program
        .blocks()
        .iter()
        .any(|b| b.adapters().next().is_some());
    let has_attention = program
        .blocks()
        .iter()
        .any(|b| b.ops().any(|op| op.kind == OpKind::Attention));
    let mut exec = vec![
        "ExecError",
        "Init",
        "Keep",
        "Param",
        "ParamSpec",
        "Tape",
        "TpGrad",
        "ValueId",
    ];
    if has_adapters {
        exec.insert(0, "Adapter");
    }
    w.lines(&use_list("autopart_runtime::exec", &exec));
    w.line(if has_attention {
        "use autopart_runtime::ops::{self, Mask};"
    } else {
        "use autopart_runtime::ops;"
    });
    w.line("use tch::Tensor;");
    w.lines(BLOCKS_PRELUDE);
    for kind in [BlockKind::Embed, BlockKind::Layer, BlockKind::Head] {
        params_fn(program, kind, &mut w);
    }
    let tied = head_tied(program)?;
    if !tied.is_empty() {
        w.blank();
        w.line("/// Parameters the head shares with the embedding (tied weights): the");
        w.line("/// last stage holds a copy, whose gradient the runtime sums with the");
        w.line("/// first stage's.");
        w.open("pub fn head_tied_params() -> Vec<ParamSpec>");
        let specs = tied
            .iter()
            .map(|p| spec_expr(p, Expr::atom(format!("\"{}\".to_string()", p.pattern))))
            .collect();
        w.stmt(&Stmt::Expr(Expr::square("vec!", specs), ""));
        w.close();
    }
    let gens: Vec<BlockGen> = program
        .blocks()
        .into_iter()
        .map(|b| BlockGen::new(b, &options.custom_ops))
        .collect();
    for g in &gens {
        g.weights_struct(&mut w);
    }
    for g in &gens {
        g.function(&mut w)?;
    }
    Ok(w.finish())
}

/// Every parameter a block reads is one the program declares.
fn check_params(program: &ExecProgram) -> Result<(), CodegenError> {
    for block in program.blocks() {
        for op in block.ops() {
            for operand in &op.inputs {
                if let Operand::Param(p) = operand
                    && !program.params.iter().any(|d| &d.pattern == p)
                {
                    return Err(CodegenError::UnknownParam {
                        op: op.traced.clone(),
                        param: p.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

fn keeps_expr(recompute: Recompute) -> &'static str {
    match recompute {
        Recompute::None => "Keeps {\n    body: Keep::Activations,\n    core: Keep::Activations,\n}",
        Recompute::Selective => "Keeps {\n    body: Keep::Activations,\n    core: Keep::Inputs,\n}",
        // Full recompute reruns whole layers ([`block_keep`]); inside a
        // rerun layer every segment keeps its activations.
        Recompute::Full => "Keeps {\n    body: Keep::Activations,\n    core: Keep::Activations,\n}",
    }
}

/// What each layer block keeps: its input only under full recompute.
fn block_keep(recompute: Recompute) -> &'static str {
    match recompute {
        Recompute::Full => "Keep::Inputs",
        Recompute::None | Recompute::Selective => "Keep::Activations",
    }
}

/// The call of block `kind` from a stage: `blocks::layer(&self.w, lw, ..)?`.
fn block_call(program: &ExecProgram, kind: BlockKind, bound: &str, args: &[&str]) -> Expr {
    block_call_expr(program, kind, bound, args).try_()
}

/// [`block_call`] without the `?`.
fn block_call_expr(program: &ExecProgram, kind: BlockKind, bound: &str, args: &[&str]) -> Expr {
    let g = BlockGen::new(block_of(program, kind), &NO_CUSTOM_OPS);
    let (name, _, _) = block_names(kind);
    let mut all = vec!["&self.w", bound, "tape", "tp", "self.tp_rank"];
    all.extend_from_slice(args);
    if g.uses_total_tokens() {
        all.push("total_tokens");
    }
    Expr::call(
        format!("blocks::{name}"),
        all.into_iter().map(Expr::atom).collect(),
    )
}

fn stage_rs(program: &ExecProgram, stage: &StageProgram, options: &CodegenOptions) -> String {
    let k = stage.index;
    let n_chunks = stage.chunks.len();
    let mut w = Writer::new();
    let ranges: Vec<String> = stage
        .chunks
        .iter()
        .map(|(a, b)| format!("layers {a}..{b}"))
        .collect();
    w.lines(&header(options, "//"));
    w.line(format!(
        "//! Pipeline stage {k} of {}: {}{}{}; recompute {}.",
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
    ));
    w.line("//! Generated by autopart; do not edit.");
    w.blank();
    w.line("use autopart_runtime::comm::Communicator;");
    w.line("use autopart_runtime::exec::{ExecError, Keep, Param, Tape, ValueId};");
    w.line("use autopart_runtime::program::StageModule;");
    w.line("use tch::Tensor;");
    w.blank();
    let mut imports = vec!["self"];
    if stage.embedding {
        imports.push("EmbedWeights");
    }
    if stage.head {
        imports.push("HeadWeights");
    }
    imports.extend(["Keeps", "LayerWeights", "Weights"]);
    w.lines(&use_list("crate::blocks", &imports));
    w.blank();
    w.lines(&format!(
        "const KEEPS: {};",
        keeps_expr(stage.recompute).replacen("Keeps {", "Keeps = Keeps {", 1)
    ));
    w.line("/// What each layer keeps between its forward and its backward.");
    w.line(format!(
        "const BLOCK: Keep = {};",
        block_keep(stage.recompute)
    ));
    w.blank();
    w.line(format!(
        "/// This rank's part of stage {k}: its parameter shards."
    ));
    w.line("#[derive(Debug)]");
    w.open("pub struct Stage");
    w.line("w: Weights,");
    if stage.embedding {
        w.line("embed: EmbedWeights,");
    }
    w.line("/// Each layer of the stage, model chunk after model chunk.");
    w.line("layers: Vec<LayerWeights>,");
    if stage.head {
        w.line("head: HeadWeights,");
    }
    w.line("tp_rank: i64,");
    w.close();
    w.blank();

    w.open("impl Stage");
    w.open("pub fn new(tp_rank: usize, tp: usize, seed: u64) -> Result<Self, ExecError>");
    w.line("let mut specs = Vec::new();");
    if stage.embedding {
        w.line("specs.extend(blocks::embed_params());");
    }
    for (a, b) in &stage.chunks {
        w.open(format!("for i in {a}..{b}"));
        w.line("specs.extend(blocks::layer_params(i));");
        w.close();
    }
    // `head_tied` was checked when blocks.rs was generated.
    let tied = head_tied(program).unwrap_or_default();
    if stage.head {
        w.line("specs.extend(blocks::head_params());");
        if !stage.embedding && !tied.is_empty() {
            w.line("specs.extend(blocks::head_tied_params());");
        }
    }
    w.line("let w = Weights::new(specs, seed, tp_rank, tp)?;");
    if stage.embedding {
        w.line("let embed = EmbedWeights::bind(&w)?;");
    }
    w.line("let mut layers = Vec::new();");
    for (a, b) in &stage.chunks {
        w.open(format!("for i in {a}..{b}"));
        w.line("layers.push(LayerWeights::bind(&w, i)?);");
        w.close();
    }
    if stage.head {
        w.line("let head = HeadWeights::bind(&w)?;");
    }
    w.open("Ok(Self");
    w.line("w,");
    if stage.embedding {
        w.line("embed,");
    }
    w.line("layers,");
    if stage.head {
        w.line("head,");
    }
    w.line("tp_rank: tp_rank as i64,");
    w.close_with(")");
    w.close();
    w.close();
    w.blank();

    w.open("impl StageModule for Stage");
    w.open("fn params(&self) -> &[Param]");
    w.line("self.w.params()");
    w.close();
    w.blank();
    w.open("fn params_mut(&mut self) -> &mut [Param]");
    w.line("self.w.params_mut()");
    w.close();
    w.blank();
    w.open("fn n_chunks(&self) -> usize");
    w.line(n_chunks.to_string());
    w.close();
    w.blank();
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
    w.line("#[allow(clippy::too_many_arguments)]");
    fn_signature(
        &mut w,
        "fn forward<'a>",
        &[
            "&'a self".to_string(),
            "tape: &mut Tape<'a>".to_string(),
            "tp: &'a dyn Communicator".to_string(),
            "chunk: usize".to_string(),
            format!("{}: Option<Tensor>", used("input", any_received)),
            format!("{}: &Tensor", used("tokens", any_first)),
            format!("{}: &Tensor", used("labels", any_last)),
            format!("{}: i64", used("total_tokens", any_last && head_total)),
        ],
        " -> Result<(Option<ValueId>, ValueId), ExecError>",
    );
    w.open("match chunk");
    let total_layers: u32 = stage.chunks.iter().map(|(a, b)| b - a).sum();
    let mut place = 0u32;
    for (c, (a, b)) in stage.chunks.iter().enumerate() {
        let first = stage.embedding && c == 0;
        let last = stage.head && c + 1 == n_chunks;
        w.open(format!("{c} =>"));
        if first {
            w.line("let tokens = tape.input(tokens);");
            w.stmt(&Stmt::let_(
                "mut x",
                block_call(program, BlockKind::Embed, "&self.embed", &["tokens"]),
            ));
            w.line("let entry = None;");
        } else {
            w.open("let received = input.ok_or_else(||");
            w.line("ExecError::Pipeline(");
            w.line(format!(
                "    \"stage {k} chunk {c}: forward before its activation arrived\".into(),"
            ));
            w.line(")");
            w.close_with(")?;");
            w.line("let mut x = tape.input(&received);");
            w.line("let entry = Some(x);");
        }
        let n = b - a;
        let layers = if n == total_layers {
            "self.layers.iter().enumerate()".to_string()
        } else {
            let skip = if place == 0 {
                String::new()
            } else {
                format!(".skip({place})")
            };
            format!("self.layers.iter().enumerate(){skip}.take({n})")
        };
        place += n;
        // Block ids are places in `self.layers` (`blocks()`).
        w.open(format!("for (b, lw) in {layers}"));
        w.stmt(&Stmt::assign(
            "x",
            Expr::call(
                "tape.block",
                vec![
                    Expr::atom("b"),
                    Expr::atom("BLOCK"),
                    Expr::atom("x"),
                    Expr::Closure {
                        head: "move |tape, x|".into(),
                        body: vec![Stmt::Expr(
                            block_call_expr(program, BlockKind::Layer, "lw", &["x", "KEEPS"]),
                            "",
                        )],
                    },
                ],
            )
            .try_(),
        ));
        w.close();
        if last {
            w.line("let labels = tape.input(labels);");
            w.stmt(&Stmt::let_(
                "loss",
                block_call(program, BlockKind::Head, "&self.head", &["x", "labels"]),
            ));
            w.line("Ok((entry, loss))");
        } else {
            w.line("Ok((entry, x))");
        }
        w.close();
    }
    w.line("_ => Err(ExecError::Pipeline(format!(");
    w.line(format!("    \"model chunk {{chunk}} is not on stage {k}\""));
    w.line("))),");
    w.close();
    w.close();
    w.blank();
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
    w.open("fn boundary_shape(&self, mbs: i64, seq: i64) -> Vec<i64>");
    w.stmt(&Stmt::Expr(
        Expr::Array {
            prefix: "vec![".into(),
            items: dims,
        },
        "",
    ));
    w.close();
    w.blank();
    w.open("fn loss_is_partial(&self) -> bool");
    w.line(program.loss_is_partial().to_string());
    w.close();
    w.blank();
    let (arg, body) = fusable_fn(stage.recompute);
    w.open(format!("fn fusable(&self, {arg}) -> bool"));
    w.line(body);
    w.close();
    w.blank();
    w.open("fn blocks(&self) -> Vec<Vec<usize>>");
    w.line("self.layers.iter().map(LayerWeights::places).collect()");
    w.close();
    if !tied.is_empty() && stage.embedding != stage.head {
        w.blank();
        w.open("fn pp_tied(&self) -> Vec<String>");
        let names = tied
            .iter()
            .map(|p| Expr::atom(format!("\"{}\".to_string()", p.pattern)))
            .collect();
        w.stmt(&Stmt::Expr(Expr::square("vec!", names), ""));
        w.close();
    }
    w.close();
    w.finish()
}

/// `fusable`'s parameter and body: a fused tape when nothing is recomputed
/// and tp is 1.
fn fusable_fn(recompute: Recompute) -> (&'static str, &'static str) {
    if recompute == Recompute::None {
        ("tp_size: usize", "tp_size == 1")
    } else {
        ("_tp_size: usize", "false")
    }
}

fn schedule_expr(s: Schedule) -> String {
    match s {
        Schedule::GPipe => "Schedule::GPipe".into(),
        Schedule::OneFOneB => "Schedule::OneFOneB".into(),
        Schedule::Interleaved { chunks } => format!("Schedule::Interleaved {{ chunks: {chunks} }}"),
    }
}

/// The runtime's ZeRO stage for the plan's.
fn zero_expr(zero: ZeroStage) -> &'static str {
    match zero {
        ZeroStage::Off => "ZeroStage::Off",
        ZeroStage::One => "ZeroStage::One",
        ZeroStage::Two => "ZeroStage::Two",
        ZeroStage::Three => "ZeroStage::Three",
    }
}

fn dtype_expr(d: crate::plan::DType) -> &'static str {
    use crate::plan::DType;
    match d {
        DType::Bf16 => "DType::Bf16",
        DType::Fp16 => "DType::Fp16",
        DType::Fp32 => "DType::Fp32",
    }
}

fn main_rs(program: &ExecProgram, options: &CodegenOptions) -> String {
    let mut w = Writer::new();
    w.lines(&header(options, "//"));
    w.lines(&format!(
        "//! {} on {} GPUs (tp {}, pp {}, dp {}; {} at run time), generated by\n//! autopart from plan.ron. Run it with `mpirun -np {} autopart run OUT`.",
        doc_safe(&program.model),
        program.plan_gpus,
        program.tp,
        program.pp,
        program.dp,
        program.runtime_gpus,
        program.runtime_gpus
    ));
    w.blank();
    w.line("mod blocks;");
    for s in &program.stages {
        w.line(format!("mod stage_{};", s.index));
    }
    w.blank();
    w.line("use std::process::ExitCode;");
    w.blank();
    w.line(
        "use autopart_runtime::app::{self, BuiltStage, DType, PlanMeta, Schedule, StageCtx, ZeroStage};",
    );
    w.line("use autopart_runtime::exec::ExecError;");
    w.blank();
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
    w.open("const PLAN: PlanMeta = PlanMeta");
    let atom = |s: String| Expr::Atom(s);
    let fields = [
        ("model", atom(format!("{:?}", program.model))),
        ("plan_hash", atom(format!("{:?}", options.plan_hash))),
        ("vocab", atom(program.vocab.to_string())),
        ("seq_len", atom(program.seq_len.to_string())),
        (
            "global_batch",
            atom((program.global_batch / u64::from(replicas)).to_string()),
        ),
        ("micro_batch", atom(program.micro_batch.to_string())),
        ("micro_batches", atom(program.micro_batches.to_string())),
        ("tp", atom(program.tp.to_string())),
        ("pp", atom(program.pp.to_string())),
        ("dp", atom(program.dp.to_string())),
        ("plan_gpus", atom(program.plan_gpus.to_string())),
        ("runtime_gpus", atom(program.runtime_gpus.to_string())),
        ("schedule", atom(schedule_expr(program.schedule))),
        ("zero", atom(zero.to_string())),
        ("dtype", atom(dtype_expr(program.dtype).into())),
        (
            "reduce_dtype",
            atom(dtype_expr(program.reduce_dtype).into()),
        ),
        (
            "predicted_peak_bytes",
            Expr::Array {
                prefix: "&[".into(),
                items: peaks,
            },
        ),
        ("predicted_step_s", atom(f64_lit(program.predicted_step_s))),
        ("hf_config", atom(format!("{:?}", options.hf_config))),
    ];
    for (name, value) in fields {
        w.stmt(&Stmt::field(name, value));
    }
    w.close_with(";");
    w.blank();
    w.line("/// This rank's part of the model: its pipeline stage, sharded over tp.");
    w.open("fn build_stage(ctx: StageCtx) -> BuiltStage");
    w.line("let (tp_rank, tp, seed) = (ctx.coord.tp, ctx.mesh.tp, ctx.seed);");
    w.open("match ctx.coord.pp");
    for s in &program.stages {
        w.line(format!(
            "{} => Ok(Box::new(stage_{}::Stage::new(tp_rank, tp, seed)?)),",
            s.index, s.index
        ));
    }
    w.line("stage => Err(ExecError::Plan(format!(");
    w.line(format!(
        "    \"pipeline stage {{stage}} is not in this plan of {} stages\"",
        program.pp
    ));
    w.line("))),");
    w.close();
    w.close();
    w.blank();
    w.open("fn main() -> ExitCode");
    w.line("app::main(&PLAN, build_stage)");
    w.close();
    w.finish()
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
        r#"{}[package]
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
[profile.dev]
debug = "line-tables-only"

[profile.dev.package."*"]
opt-level = 2
debug = false
"#,
        header(options, "#")
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

/// Every file of the generated crate, and its package name.
pub fn generate_files(
    program: &ExecProgram,
    options: &CodegenOptions,
) -> Result<(String, Vec<GeneratedFile>), CodegenError> {
    let hash = &options.plan_hash;
    if hash.len() != 16 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CodegenError::PlanHash(hash.clone()));
    }
    let mut files = vec![
        GeneratedFile {
            path: "src/main.rs".into(),
            text: main_rs(program, options),
        },
        GeneratedFile {
            path: "src/blocks.rs".into(),
            text: blocks_rs(program, options)?,
        },
    ];
    for s in &program.stages {
        files.push(GeneratedFile {
            path: format!("src/stage_{}.rs", s.index),
            text: stage_rs(program, s, options),
        });
    }
    files.push(GeneratedFile {
        path: "build.rs".into(),
        text: format!("{}{BUILD_RS}", header(options, "//")),
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

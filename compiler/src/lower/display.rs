//! The text form of a lowered program.

use std::fmt;

use super::{Block, BlockInput, ExecProgram, Operand, Step, Vid};
use crate::plan::ZeroStage;

fn shape(s: &[u64]) -> String {
    s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

struct BlockView<'a>(&'a Block);

impl fmt::Display for BlockView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let name = |v: &Vid| {
            b.value(*v)
                .map_or_else(|| format!("%{}", v.0), |d| format!("%{}", d.name))
        };
        for (i, input) in b.inputs.iter().enumerate() {
            let v = Vid(i as u32);
            if let Some(d) = b.value(v) {
                let what = match input {
                    BlockInput::Stream => "stream",
                    BlockInput::Tokens => "tokens",
                    BlockInput::Labels => "labels",
                };
                writeln!(
                    f,
                    "    in {} ({what}): {}[{}] {}",
                    name(&v),
                    d.dtype,
                    shape(&d.shape),
                    d.state
                )?;
            }
        }
        for step in &b.steps {
            match step {
                Step::Adapter {
                    kind,
                    input,
                    output,
                } => {
                    let d = b.value(*output);
                    writeln!(
                        f,
                        "    {} = {kind}({})  -> [{}] {}",
                        name(output),
                        name(input),
                        d.map_or(String::new(), |d| shape(&d.shape)),
                        d.map_or(String::new(), |d| d.state.to_string()),
                    )?;
                }
                Step::Segment(seg) => {
                    let ins: Vec<String> = seg.inputs.iter().map(name).collect();
                    let outs: Vec<String> = seg.outputs.iter().map(name).collect();
                    writeln!(
                        f,
                        "    segment {}{} ({}) -> ({})",
                        seg.name,
                        if seg.attention_core {
                            " [attention core]"
                        } else {
                            ""
                        },
                        ins.join(", "),
                        outs.join(", ")
                    )?;
                    for op in &seg.ops {
                        let args: Vec<String> = op
                            .inputs
                            .iter()
                            .zip(&op.input_states)
                            .map(|(o, s)| match o {
                                Operand::Value(v) => name(v),
                                Operand::Param(p) => format!("{p}:{s}"),
                            })
                            .collect();
                        let outs: Vec<String> = op
                            .outputs
                            .iter()
                            .map(|v| {
                                b.value(*v).map_or_else(
                                    || name(v),
                                    |d| format!("{}: [{}] {}", name(v), shape(&d.shape), d.state),
                                )
                            })
                            .collect();
                        let split = op
                            .split
                            .as_ref()
                            .map_or(String::new(), |s| format!(" split {s}"));
                        let offset = op
                            .offset_unit
                            .map_or(String::new(), |u| format!(" offset tp_rank*{u}"));
                        writeln!(
                            f,
                            "      {} = {}({}){split}{offset}  # {}",
                            outs.join(", "),
                            op.kind.name(),
                            args.join(", "),
                            op.traced
                        )?;
                    }
                }
            }
        }
        writeln!(f, "    out {}", name(&b.output))
    }
}

impl fmt::Display for ExecProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "program {}: tp {} pp {} dp {} ({} plan GPUs, {} at run time), micro-batch {} x {}, global batch {}, seq {}, {}, zero {}{}",
            self.model,
            self.tp,
            self.pp,
            self.dp,
            self.plan_gpus,
            self.runtime_gpus,
            self.micro_batch,
            self.micro_batches,
            self.global_batch,
            self.seq_len,
            self.schedule,
            self.zero,
            if self.sequence_parallel { ", sp" } else { "" }
        )?;
        writeln!(
            f,
            "stream: [{}] {}",
            shape(&self.stream_shape),
            self.stream_state
        )?;
        for (title, block) in [
            ("embed", &self.embed),
            ("layer (every transformer layer)", &self.layer),
            ("head", &self.head),
        ] {
            writeln!(f, "block {title}:")?;
            write!(f, "{}", BlockView(block))?;
        }
        let partial: Vec<&str> = self
            .params
            .iter()
            .filter(|p| p.tp_grad_partial && self.tp > 1)
            .map(|p| p.pattern.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        writeln!(f, "gradient reducers:")?;
        if partial.is_empty() {
            writeln!(f, "  tp: none (every tp gradient is complete)")?;
        } else {
            writeln!(f, "  tp all-reduce (partial sums): {}", partial.join(", "))?;
        }
        let copied: Vec<String> = self
            .params
            .iter()
            .filter(|p| p.copies > 1)
            .map(|p| format!("{} (x{})", p.pattern, p.copies))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !copied.is_empty() {
            writeln!(
                f,
                "  tp sum over the ranks holding one copied block: {}",
                copied.join(", ")
            )?;
        }
        let dp = self.dp * self.runtime_gpus.checked_div(self.plan_gpus).unwrap_or(1);
        writeln!(
            f,
            "  dp ({dp} ranks): {}",
            match self.zero {
                ZeroStage::Off => "bucketed all-reduce of every gradient",
                ZeroStage::One | ZeroStage::Two =>
                    "bucketed reduce-scatter, sharded AdamW, all-gather (ZeRO-1)",
                ZeroStage::Three =>
                    "parameters gathered per step, reduce-scatter, sharded AdamW (ZeRO-3)",
            }
        )?;
        for s in &self.stages {
            let chunks: Vec<String> = s
                .chunks
                .iter()
                .map(|(a, b)| format!("layers {a}..{b}"))
                .collect();
            let params = self.stage_params(s);
            let local: u64 = params
                .iter()
                .map(|p| p.local_shape.iter().product::<u64>())
                .sum();
            writeln!(
                f,
                "stage {}: {}{}{}, recompute {}, {} params ({} per rank)",
                s.index,
                if s.embedding { "embed, " } else { "" },
                chunks.join(" + "),
                if s.head { ", head" } else { "" },
                s.recompute,
                params.len(),
                local
            )?;
        }
        Ok(())
    }
}

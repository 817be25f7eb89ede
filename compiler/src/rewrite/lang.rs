//! The e-graph language of a block, the analysis that gives every e-class
//! its [`State`], and the rewrite rules over it.
//!
//! A block becomes one expression: block inputs and parameters are leaves,
//! each adapter is a unary node carrying its [`AdapterKind`], each local op
//! is a node whose first child is a [`Node::Tmpl`] leaf naming its
//! [`Template`] (the op with its input states and output state) and whose
//! other children are its operands in order. A [`Node::Root`] gathers the
//! block's output (and any value nobody reads, so that no op is lost).
//!
//! Every rule only unions e-classes of equal [`Info`] (forward layout,
//! gradient layout, full shape, dtype); the analysis records any other union
//! as a conflict, which the driver turns into an error.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use egg::{Analysis, Applier, DidMerge, EGraph, Id, Language, SearchMatches, Searcher, Subst, Var};

use crate::anno::Layout;
use crate::ir::{DType, OpKind};
use crate::lower::{AdapterKind, LocalOp, Operand, State};

/// A node of a block's expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Node {
    /// Block input `i`.
    Input(u32),
    /// Parameter operand, an index into [`Layouts::params`].
    Param(u32),
    /// An op template, an index into [`Layouts::templates`].
    Tmpl(u32),
    Adapt(AdapterKind, [Id; 1]),
    /// A local op: `[template leaf, operands...]`.
    Op(Vec<Id>),
    /// The block's output first, then values nobody reads.
    Root(Vec<Id>),
}

impl Language for Node {
    type Discriminant = std::mem::Discriminant<Node>;

    fn discriminant(&self) -> Self::Discriminant {
        std::mem::discriminant(self)
    }

    fn matches(&self, other: &Self) -> bool {
        match (self, other) {
            (Node::Input(a), Node::Input(b))
            | (Node::Param(a), Node::Param(b))
            | (Node::Tmpl(a), Node::Tmpl(b)) => a == b,
            (Node::Adapt(a, _), Node::Adapt(b, _)) => a == b,
            (Node::Op(a), Node::Op(b)) | (Node::Root(a), Node::Root(b)) => a.len() == b.len(),
            _ => false,
        }
    }

    fn children(&self) -> &[Id] {
        match self {
            Node::Input(_) | Node::Param(_) | Node::Tmpl(_) => &[],
            Node::Adapt(_, c) => c,
            Node::Op(c) | Node::Root(c) => c,
        }
    }

    fn children_mut(&mut self) -> &mut [Id] {
        match self {
            Node::Input(_) | Node::Param(_) | Node::Tmpl(_) => &mut [],
            Node::Adapt(_, c) => c,
            Node::Op(c) | Node::Root(c) => c,
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Input(i) => write!(f, "in{i}"),
            Node::Param(i) => write!(f, "param{i}"),
            Node::Tmpl(i) => write!(f, "op{i}"),
            Node::Adapt(k, _) => write!(f, "{k}"),
            Node::Op(_) => f.write_str("op"),
            Node::Root(_) => f.write_str("root"),
        }
    }
}

/// What a value e-class is: its state, its unpartitioned shape and dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Info {
    pub state: State,
    pub full: Vec<u64>,
    pub dtype: DType,
}

impl Info {
    pub fn full_bytes(&self) -> f64 {
        self.full.iter().product::<u64>() as f64 * self.dtype.size_bytes() as f64
    }

    /// The shape on one rank.
    pub fn local(&self, tp: u64) -> Vec<u64> {
        let mut s = self.full.clone();
        if let Layout::D(d) = self.state.fwd
            && let Some(len) = s.get_mut(d)
        {
            *len /= tp.max(1);
        }
        s
    }

    pub fn local_bytes(&self, tp: u64) -> f64 {
        self.local(tp).iter().product::<u64>() as f64 * self.dtype.size_bytes() as f64
    }
}

/// An e-class's analysis data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Data {
    /// Parameters, templates and the root: no state.
    Leaf,
    Value(Info),
}

/// A local op with the states it reads and makes; operand positions match
/// the op node's children after the template leaf.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    /// The op as lowered (its `inputs` name the parameter operands, its
    /// `input_states` are the states it reads).
    pub op: LocalOp,
    pub output: Info,
    /// The output value's name.
    pub name: String,
    /// Program position of the original op, for scheduling.
    pub order: usize,
}

/// The e-graph analysis: the tables leaves index into, and conflicts found.
#[derive(Debug, Default)]
pub(crate) struct Layouts {
    pub tp: u64,
    pub inputs: Vec<Info>,
    pub params: Vec<String>,
    pub templates: Vec<Template>,
    /// (template, dim) → the template moved onto `D(dim)` shards.
    pub moved: HashMap<(u32, usize), u32>,
    pub conflicts: Vec<String>,
}

pub(crate) type Graph = EGraph<Node, Layouts>;

impl Layouts {
    /// The template of `t` run on `D(dim)` shards: value inputs and output
    /// `D(dim)`, replicated parameters read with partial gradients.
    pub fn moved_template(&mut self, t: u32, dim: usize) -> Option<u32> {
        if let Some(&m) = self.moved.get(&(t, dim)) {
            return Some(m);
        }
        let mut tm = self.templates.get(t as usize)?.clone();
        let shard = State::produced(Layout::D(dim));
        for (operand, s) in tm.op.inputs.iter().zip(tm.op.input_states.iter_mut()) {
            *s = match operand {
                Operand::Value(_) => shard,
                Operand::Param(_) => State::consumed(Layout::R, true),
            };
        }
        tm.op.split = split_identifier(&tm.op.annotation, dim);
        tm.output.state = shard;
        let m = self.templates.len() as u32;
        self.templates.push(tm);
        self.moved.insert((t, dim), m);
        Some(m)
    }
}

/// The identifier that names output dim `dim` in an annotation such as
/// `b l d^, d^ -> b l d^` (`l` for dim 1).
fn split_identifier(annotation: &str, dim: usize) -> Option<String> {
    let outputs = annotation.split("->").nth(1)?;
    let first = outputs.split(',').next()?;
    let id = first.split_whitespace().nth(dim)?;
    Some(id.trim_end_matches(['^', '+']).to_string())
}

/// The template index of a template leaf's e-class.
pub(crate) fn template_of(egraph: &Graph, leaf: Id) -> Option<u32> {
    egraph[leaf].nodes.iter().find_map(|n| match n {
        Node::Tmpl(t) => Some(*t),
        _ => None,
    })
}

pub(crate) fn info(egraph: &Graph, id: Id) -> Option<&Info> {
    match &egraph[id].data {
        Data::Value(i) => Some(i),
        Data::Leaf => None,
    }
}

impl Analysis<Node> for Layouts {
    type Data = Data;

    fn make(egraph: &mut Graph, enode: &Node, _id: Id) -> Data {
        let made = match enode {
            Node::Param(_) | Node::Tmpl(_) | Node::Root(_) => Ok(Data::Leaf),
            Node::Input(i) => egraph
                .analysis
                .inputs
                .get(*i as usize)
                .cloned()
                .map(Data::Value)
                .ok_or_else(|| format!("block input {i} has no state")),
            Node::Adapt(kind, [x]) => {
                let (from, to) = kind.states();
                match info(egraph, *x) {
                    Some(i) if i.state == from => Ok(Data::Value(Info {
                        state: to,
                        ..i.clone()
                    })),
                    Some(i) => Err(format!("{kind} reads a value in state {}", i.state)),
                    None => Err(format!("{kind} reads something that is not a value")),
                }
            }
            Node::Op(children) => make_op(egraph, children),
        };
        made.unwrap_or_else(|msg| {
            egraph.analysis.conflicts.push(msg);
            Data::Leaf
        })
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        if *a != b {
            self.conflicts
                .push(format!("a rule equated values of {a:?} and {b:?}"));
        }
        DidMerge(false, *a != b)
    }
}

fn make_op(egraph: &Graph, children: &[Id]) -> Result<Data, String> {
    let Some((&leaf, operands)) = children.split_first() else {
        return Err("an op node without a template".into());
    };
    let t = template_of(egraph, leaf).ok_or("an op node without a template")?;
    let tm = egraph
        .analysis
        .templates
        .get(t as usize)
        .ok_or("an op node names an unknown template")?;
    if operands.len() != tm.op.input_states.len() {
        return Err(format!("{} has the wrong operand count", tm.op.traced));
    }
    for (&c, want) in operands.iter().zip(&tm.op.input_states) {
        if let Some(i) = info(egraph, c)
            && i.state != *want
        {
            return Err(format!(
                "{} reads a value in state {} instead of {want}",
                tm.op.traced, i.state
            ));
        }
    }
    Ok(Data::Value(tm.output.clone()))
}

/// A rewrite written in Rust: `find` lists matches in an e-class as lists
/// of e-class ids, `apply` builds the equivalent term and returns its id.
pub(crate) trait Rule: Send + Sync + 'static {
    fn find(&self, egraph: &Graph, class: Id) -> Vec<Vec<Id>>;
    fn apply(&self, egraph: &mut Graph, class: Id, ids: &[Id]) -> Option<Id>;
}

/// Adapts a [`Rule`] to egg's searcher and applier; matches travel as
/// substitutions `?0, ?1, ...`.
pub(crate) struct Custom<R>(pub Arc<R>);

fn var(i: usize) -> Option<Var> {
    format!("?{i}").parse().ok()
}

impl<R: Rule> Searcher<Node, Layouts> for Custom<R> {
    fn search_eclass_with_limit(
        &self,
        egraph: &Graph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, Node>> {
        let substs: Vec<Subst> = self
            .0
            .find(egraph, eclass)
            .into_iter()
            .take(limit)
            .map(|ids| {
                let mut s = Subst::with_capacity(ids.len());
                for (i, id) in ids.into_iter().enumerate() {
                    if let Some(v) = var(i) {
                        s.insert(v, id);
                    }
                }
                s
            })
            .collect();
        (!substs.is_empty()).then_some(SearchMatches {
            eclass,
            substs,
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        Vec::new()
    }
}

impl<R: Rule> Applier<Node, Layouts> for Custom<R> {
    fn apply_one(
        &self,
        egraph: &mut Graph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&egg::PatternAst<Node>>,
        _rule: egg::Symbol,
    ) -> Vec<Id> {
        let ids: Vec<Id> = (0..)
            .map_while(|i| var(i).and_then(|v| subst.get(v).copied()))
            .collect();
        let Some(new) = self.0.apply(egraph, eclass, &ids) else {
            return Vec::new();
        };
        if egraph[new].data != egraph[eclass].data {
            // A rule that would equate different states is a defect; keep
            // the e-graph sound and report it.
            let msg = format!(
                "a rule proposed {:?} for a class of {:?}",
                egraph[new].data, egraph[eclass].data
            );
            egraph.analysis.conflicts.push(msg);
            return Vec::new();
        }
        if egraph.union(eclass, new) {
            vec![new]
        } else {
            Vec::new()
        }
    }
}

fn adapters(egraph: &Graph, class: Id) -> impl Iterator<Item = (AdapterKind, Id)> + '_ {
    egraph[class].nodes.iter().filter_map(|n| match n {
        Node::Adapt(k, [x]) => Some((*k, *x)),
        _ => None,
    })
}

/// `outer(inner(x))` → `x` (`result` none) or `result(x)`.
///
/// Sound pairs (forward; backward), with the states of the adapter table:
/// - `gather_d(chunk_d(x))` = x: chunk then all-gather; chunk of the gradient then all-gather;
/// - `chunk_d(gather_d(x))` = x: all-gather then chunk; all-gather then chunk;
/// - `all_to_all(j->i)(all_to_all(i->j)(x))` = x both ways;
/// - `chunk_d(all_reduce(x))` = `reduce_scatter_d(x)`: all-reduce then chunk
///   is reduce-scatter; the dual all-gathers the gradient (chunk's dual) and
///   passes it on (all-reduce's dual), reduce-scatter's dual all-gathers;
/// - `copy(gather_d(x))` = `gather_for_shards_d(x)`: all-gather; the partial
///   gradient is all-reduced (copy's dual) then chunked (gather's dual),
///   which is reduce-scatter, gather-for-shards' dual;
/// - `chunk_j(gather_i(x))` = `all_to_all(i->j)(x)`: the gradient is
///   all-gathered on j then chunked on i, what all-to-all's dual does.
#[derive(Debug)]
pub(crate) struct Compose {
    pub inner: AdapterKind,
    pub outer: AdapterKind,
    pub result: Option<AdapterKind>,
}

impl Rule for Compose {
    fn find(&self, egraph: &Graph, class: Id) -> Vec<Vec<Id>> {
        let mut out = Vec::new();
        for (k2, c) in adapters(egraph, class) {
            if k2 != self.outer {
                continue;
            }
            for (k1, x) in adapters(egraph, c) {
                if k1 == self.inner {
                    out.push(vec![x]);
                }
            }
        }
        out
    }

    fn apply(&self, egraph: &mut Graph, _class: Id, ids: &[Id]) -> Option<Id> {
        let &[x] = ids else { return None };
        match self.result {
            None => Some(x),
            Some(k) => Some(egraph.add(Node::Adapt(k, [x]))),
        }
    }
}

/// `all_reduce(x)` → `gather_d(reduce_scatter_d(x))`: reduce-scatter then
/// all-gather is an all-reduce; backward, the all-reduce passes the
/// replicated gradient on, and chunk (gather's dual) then all-gather
/// (reduce-scatter's dual) gives it back unchanged.
#[derive(Debug)]
pub(crate) struct SplitAllReduce {
    pub dim: usize,
    pub seq_len: u64,
}

impl Rule for SplitAllReduce {
    fn find(&self, egraph: &Graph, class: Id) -> Vec<Vec<Id>> {
        let tp = egraph.analysis.tp;
        adapters(egraph, class)
            .filter(|&(k, x)| {
                k == AdapterKind::AllReduce
                    && info(egraph, x).is_some_and(|i| {
                        i.full.len() > self.dim + 1
                            && i.full[self.dim] == self.seq_len
                            && i.full[self.dim] % tp == 0
                    })
            })
            .map(|(_, x)| vec![x])
            .collect()
    }

    fn apply(&self, egraph: &mut Graph, _class: Id, ids: &[Id]) -> Option<Id> {
        let &[x] = ids else { return None };
        let rs = egraph.add(Node::Adapt(
            AdapterKind::ReduceScatter { dim: self.dim },
            [x],
        ));
        Some(egraph.add(Node::Adapt(AdapterKind::Gather { dim: self.dim }, [rs])))
    }
}

/// `op(gather_d(a), gather_d(b))` → `gather_d(op'(a, b))` and
/// `op(gather_d(a), r)` → `gather_d(op'(a, chunk_d(r)))` for a replicated
/// element-wise op or norm over the last dim, `d` not that dim, and every
/// value operand of the output's full shape (no broadcasting). `op'` runs on
/// `D(d)` shards; its replicated parameters get partial gradients.
///
/// Forward, these ops act row by row along `d`, so they commute with
/// all-gather and chunk on `d`. Backward, the original op returns whole
/// gradients that gather's dual chunks (and chunk's dual all-gathers for
/// `r`), the moved op returns the chunks directly (and `r`'s chunk is
/// all-gathered by chunk's dual); a parameter's gradient is a sum over rows,
/// so each rank holds a partial sum, completed by the tp gradient reducer.
#[derive(Debug)]
pub(crate) struct MoveGather {
    pub dim: usize,
}

impl MoveGather {
    fn movable(&self, egraph: &Graph, t: u32) -> bool {
        let Some(tm) = egraph.analysis.templates.get(t as usize) else {
            return false;
        };
        let rank = tm.output.full.len();
        let kind_ok = match tm.op.kind {
            OpKind::Add | OpKind::SwiGlu | OpKind::Gelu => self.dim < rank,
            OpKind::RmsNorm | OpKind::LayerNorm => self.dim + 1 < rank,
            _ => false,
        };
        kind_ok
            && tm.op.split.is_none()
            && tm.op.outputs.len() == 1
            && tm.output.state == State::REPLICATED
            && tm.output.dtype.is_float()
            && tm.output.full[self.dim] % egraph.analysis.tp.max(1) == 0
            && tm.op.input_states.iter().all(|s| *s == State::REPLICATED)
    }

    /// For each operand: the shard it is gathered from, if any.
    fn gathered(&self, egraph: &Graph, operands: &[Id]) -> Vec<Option<Id>> {
        operands
            .iter()
            .map(|&c| {
                adapters(egraph, c)
                    .find_map(|(k, x)| (k == AdapterKind::Gather { dim: self.dim }).then_some(x))
            })
            .collect()
    }
}

impl Rule for MoveGather {
    fn find(&self, egraph: &Graph, class: Id) -> Vec<Vec<Id>> {
        let mut out = Vec::new();
        for node in &egraph[class].nodes {
            let Node::Op(children) = node else { continue };
            let Some((&leaf, operands)) = children.split_first() else {
                continue;
            };
            let Some(t) = template_of(egraph, leaf) else {
                continue;
            };
            if !self.movable(egraph, t) {
                continue;
            }
            let tm = &egraph.analysis.templates[t as usize];
            let same_shape = tm.op.inputs.iter().zip(operands).all(|(o, &c)| match o {
                Operand::Value(_) => info(egraph, c).is_some_and(|i| i.full == tm.output.full),
                Operand::Param(_) => true,
            });
            if same_shape && self.gathered(egraph, operands).iter().any(Option::is_some) {
                out.push(children.clone());
            }
        }
        out
    }

    fn apply(&self, egraph: &mut Graph, _class: Id, ids: &[Id]) -> Option<Id> {
        let (&leaf, operands) = ids.split_first()?;
        let t = template_of(egraph, leaf)?;
        let gathered = self.gathered(egraph, operands);
        let kinds: Vec<bool> = egraph
            .analysis
            .templates
            .get(t as usize)?
            .op
            .inputs
            .iter()
            .map(|o| matches!(o, Operand::Value(_)))
            .collect();
        let moved = egraph.analysis.moved_template(t, self.dim)?;
        let mut children = vec![egraph.add(Node::Tmpl(moved))];
        for ((&c, g), is_value) in operands.iter().zip(gathered).zip(kinds) {
            children.push(match (is_value, g) {
                (false, _) => c,
                (true, Some(shard)) => shard,
                (true, None) => egraph.add(Node::Adapt(AdapterKind::Chunk { dim: self.dim }, [c])),
            });
        }
        let op = egraph.add(Node::Op(children));
        Some(egraph.add(Node::Adapt(AdapterKind::Gather { dim: self.dim }, [op])))
    }
}

/// Every rule, for tensors up to rank `max_rank`, with `seq_dim` the
/// sequence dim (of length `seq_len`) that all-reduces may split on.
pub(crate) fn rules(
    max_rank: usize,
    seq_dim: Option<usize>,
    seq_len: u64,
) -> Vec<egg::Rewrite<Node, Layouts>> {
    fn rule<R: Rule>(name: String, r: R) -> Option<egg::Rewrite<Node, Layouts>> {
        let r = Arc::new(r);
        egg::Rewrite::new(name, Custom(r.clone()), Custom(r)).ok()
    }
    let mut out = Vec::new();
    let compose = |inner, outer, result| Compose {
        inner,
        outer,
        result,
    };
    use AdapterKind as K;
    for d in 0..max_rank {
        out.push(rule(
            format!("cancel-gather-chunk-{d}"),
            compose(K::Chunk { dim: d }, K::Gather { dim: d }, None),
        ));
        out.push(rule(
            format!("cancel-chunk-gather-{d}"),
            compose(K::Gather { dim: d }, K::Chunk { dim: d }, None),
        ));
        out.push(rule(
            format!("fuse-reduce-scatter-{d}"),
            compose(
                K::AllReduce,
                K::Chunk { dim: d },
                Some(K::ReduceScatter { dim: d }),
            ),
        ));
        out.push(rule(
            format!("fuse-gather-for-shards-{d}"),
            compose(
                K::Gather { dim: d },
                K::Copy,
                Some(K::GatherForShards { dim: d }),
            ),
        ));
        for e in 0..max_rank {
            if e == d {
                continue;
            }
            out.push(rule(
                format!("cancel-all-to-all-{d}-{e}"),
                compose(
                    K::AllToAll { from: d, to: e },
                    K::AllToAll { from: e, to: d },
                    None,
                ),
            ));
            out.push(rule(
                format!("fuse-all-to-all-{d}-{e}"),
                compose(
                    K::Gather { dim: d },
                    K::Chunk { dim: e },
                    Some(K::AllToAll { from: d, to: e }),
                ),
            ));
        }
        out.push(rule(format!("move-gather-{d}"), MoveGather { dim: d }));
    }
    if let Some(dim) = seq_dim {
        out.push(rule(
            format!("split-all-reduce-{dim}"),
            SplitAllReduce { dim, seq_len },
        ));
    }
    out.into_iter().flatten().collect()
}

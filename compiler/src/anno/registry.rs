//! Op signatures and the registry that loads them from RON annotation files.
//!
//! An annotation file is a RON list of op entries. The built-in files live in
//! `annotations/` (embedded in the binary, see [`builtin_registry`]); users
//! add their own with `--annotations FILE`. One entry:
//!
//! ```ron
//! (
//!     name: "linear",                        // the op name the tracer emits; unique
//!     doc: "y = x W^T, no bias",             // optional, default ""
//!     annotations: ["b l k+, n k+ -> b l n"], // one or more; the first whose ranks match applies
//!     flops: Formula("2 * b * l * k * n"),   // forward FLOPs, or `Profile` (measured)
//!     attrs: [                               // optional, default []
//!         (name: "eps", kind: Float, default: Some("1e-5")),
//!     ],
//!     implementation: None,                  // optional; custom ops name their Rust function:
//!     // Some((crate: "my_ops", path: "my_ops::chunked_ce", crate_path: Some("../my_ops"))),
//! )
//! ```
//!
//! - `annotations` are strings in the annotation language (ANNOTATIONS.md).
//! - A `Formula` uses `+ - * /`, parentheses, integer and float literals, and
//!   identifiers: a dim of one of the op's annotations (its length in the
//!   binding) or an `Int` attribute of the op. It counts forward FLOPs.
//! - `attrs` kinds are `Int`, `Float`, `Bool` and `Str`; `default`, when
//!   given, is written as a string and must parse as the kind.
//! - Optional strings may be written without `Some(..)`.
//! - `implementation`: `crate` is the crate the generated code depends on,
//!   `path` the Rust path of the function, `crate_path` the crate's directory
//!   (relative to the annotation file) when it is not on crates.io.
//!
//! Every error in a file names the file, line and column and says what was
//! expected. This module owns the schema and the checks; it does not trace
//! models or cost plans.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use super::ast::Annotation;
use super::bind::Binding;
use super::parse::{ParseError, parse_annotation};

/// A place in an annotation file: `annotations/linear.ron:5:20`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in chars.
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// An error in an annotation file or a registry lookup.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RegistryError {
    #[error("{path}: cannot read annotation file: {message}")]
    Io { path: String, message: String },
    /// The file is not valid RON for the schema.
    #[error("{at}: {message}")]
    Syntax { at: Location, message: String },
    #[error("{at}: invalid annotation: expected {}, found {}", .error.expected, .error.found)]
    Annotation { at: Location, error: ParseError },
    #[error("{at}: invalid flops formula: expected {expected}, found {found}")]
    Formula {
        at: Location,
        expected: String,
        found: String,
    },
    #[error(
        "{at}: unknown identifier '{name}' in the flops formula of op '{op}'; expected {expected}"
    )]
    FormulaIdent {
        at: Location,
        name: String,
        op: String,
        /// The dims and attributes the formula may use.
        expected: String,
    },
    /// Any other broken rule of the schema, with what was expected.
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
    #[error("{at}: op '{name}' is already registered by {first}")]
    Duplicate {
        at: Location,
        name: String,
        first: Location,
    },
    #[error(
        "unknown op '{name}': no annotation file registers it; add one with --annotations FILE"
    )]
    UnknownOp { name: String },
    #[error(
        "op '{name}' ({at}) has no annotation for input ranks {ranks}; expected one of: {alternatives}"
    )]
    NoMatch {
        name: String,
        at: Location,
        ranks: String,
        alternatives: String,
    },
    #[error("flops formula '{formula}': {message}")]
    Eval { formula: String, message: String },
}

// ---------------------------------------------------------------------------
// Schema

/// The kind of an op attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum AttrKind {
    Int,
    Float,
    Bool,
    Str,
}

impl fmt::Display for AttrKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An attribute an op takes, e.g. `eps` (Float) or `h` (Int).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
pub struct AttrSpec {
    pub name: String,
    pub kind: AttrKind,
    /// The default value as written; it parses as `kind`.
    #[serde(default)]
    pub default: Option<String>,
}

/// The Rust function that implements a custom op at run time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
pub struct ImplSpec {
    /// The crate the generated code depends on.
    #[serde(rename = "crate")]
    pub crate_name: String,
    /// The function's Rust path, e.g. `my_ops::chunked_ce`.
    pub path: String,
    /// The crate's directory, relative to the annotation file, when it is a
    /// path dependency.
    #[serde(default)]
    pub crate_path: Option<String>,
}

/// How to count an op's forward FLOPs.
#[derive(Clone, Debug, PartialEq)]
pub enum FlopsSpec {
    Formula(Formula),
    /// Measured by profiling; no formula.
    Profile,
}

impl FlopsSpec {
    /// The forward FLOPs for one call (`None` for `Profile`). Identifiers
    /// take their length from `binding`, else their value from `attrs`.
    pub fn eval(
        &self,
        binding: &Binding,
        attrs: &BTreeMap<String, i64>,
    ) -> Result<Option<f64>, RegistryError> {
        match self {
            FlopsSpec::Profile => Ok(None),
            FlopsSpec::Formula(formula) => formula.eval(binding, attrs).map(Some),
        }
    }
}

/// One op: its name, annotations, cost, attributes and implementation.
#[derive(Clone, Debug, PartialEq)]
pub struct OpSignature {
    pub name: String,
    pub doc: String,
    /// Alternatives in order; the first whose ranks match applies.
    pub annotations: Vec<Annotation>,
    pub flops: FlopsSpec,
    pub attrs: Vec<AttrSpec>,
    /// Set for custom ops; built-in ops are implemented by the runtime.
    pub implementation: Option<ImplSpec>,
}

impl OpSignature {
    /// The first annotation whose inputs fit tensors of these ranks (`None`
    /// for a non-tensor argument).
    pub fn select(&self, ranks: &[Option<usize>]) -> Option<&Annotation> {
        self.annotations.iter().find(|a| a.matches_ranks(ranks))
    }

    /// The attribute named `name`.
    pub fn attr(&self, name: &str) -> Option<&AttrSpec> {
        self.attrs.iter().find(|a| a.name == name)
    }
}

/// The entry as written in the file, before its strings are parsed.
#[derive(Deserialize)]
#[serde(rename = "Op", deny_unknown_fields)]
struct RawOp {
    name: String,
    #[serde(default)]
    doc: String,
    annotations: Vec<String>,
    flops: RawFlops,
    #[serde(default)]
    attrs: Vec<AttrSpec>,
    #[serde(default)]
    implementation: Option<ImplSpec>,
}

#[derive(Deserialize)]
#[serde(rename = "FlopsSpec")]
enum RawFlops {
    Formula(String),
    Profile,
}

// ---------------------------------------------------------------------------
// Registry

/// Op signatures by name, each with where it was registered.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    ops: BTreeMap<String, (OpSignature, Location)>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every op of one annotation file given as text; `file` names
    /// it in errors. On error nothing of the file is registered.
    pub fn load_str(&mut self, src: &str, file: &str) -> Result<(), RegistryError> {
        // Implicit `Some` lets `default: "1e-5"` stand for `Some("1e-5")`.
        let raw: Vec<RawOp> = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
            .from_str(src)
            .map_err(|e| RegistryError::Syntax {
                at: Location {
                    file: file.into(),
                    line: e.span.start.line,
                    col: e.span.start.col,
                },
                message: lowercase_first(&e.code.to_string()),
            })?;
        let mut locator = Locator::new(src, file);
        let mut loaded: Vec<(OpSignature, Location)> = Vec::new();
        for op in raw {
            let (sig, at) = check_op(op, &mut locator)?;
            let first = self.ops.get(&sig.name).map(|(_, first)| first).or_else(|| {
                loaded
                    .iter()
                    .find(|(s, _)| s.name == sig.name)
                    .map(|(_, l)| l)
            });
            if let Some(first) = first {
                return Err(RegistryError::Duplicate {
                    at,
                    name: sig.name,
                    first: first.clone(),
                });
            }
            loaded.push((sig, at));
        }
        for (sig, at) in loaded {
            self.ops.insert(sig.name.clone(), (sig, at));
        }
        Ok(())
    }

    /// Registers every op of the annotation file at `path`.
    pub fn load_file(&mut self, path: impl AsRef<Path>) -> Result<(), RegistryError> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| RegistryError::Io {
            path: label.clone(),
            message: lowercase_first(&e.to_string()),
        })?;
        self.load_str(&src, &label)
    }

    /// The op named `name`.
    pub fn get(&self, name: &str) -> Option<&OpSignature> {
        self.ops.get(name).map(|(sig, _)| sig)
    }

    /// Where the op named `name` was registered (its name in its file).
    pub fn source(&self, name: &str) -> Option<&Location> {
        self.ops.get(name).map(|(_, at)| at)
    }

    /// All ops by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OpSignature, &Location)> {
        self.ops
            .iter()
            .map(|(name, (sig, at))| (name.as_str(), sig, at))
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The annotation of op `name` for inputs of these ranks (`None`: a
    /// non-tensor argument).
    pub fn resolve(
        &self,
        name: &str,
        ranks: &[Option<usize>],
    ) -> Result<&Annotation, RegistryError> {
        let (sig, at) = self
            .ops
            .get(name)
            .ok_or_else(|| RegistryError::UnknownOp { name: name.into() })?;
        sig.select(ranks).ok_or_else(|| RegistryError::NoMatch {
            name: name.into(),
            at: at.clone(),
            ranks: format!(
                "[{}]",
                ranks
                    .iter()
                    .map(|r| r.map_or("-".to_string(), |r| r.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            alternatives: sig
                .annotations
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// The built-in annotation files, as `(label, contents)`.
const BUILTIN: [(&str, &str); 6] = [
    (
        "annotations/attention.ron",
        include_str!("../../../annotations/attention.ron"),
    ),
    (
        "annotations/elementwise.ron",
        include_str!("../../../annotations/elementwise.ron"),
    ),
    (
        "annotations/embedding.ron",
        include_str!("../../../annotations/embedding.ron"),
    ),
    (
        "annotations/linear.ron",
        include_str!("../../../annotations/linear.ron"),
    ),
    (
        "annotations/loss.ron",
        include_str!("../../../annotations/loss.ron"),
    ),
    (
        "annotations/norm.ron",
        include_str!("../../../annotations/norm.ron"),
    ),
];

/// The registry of every built-in op (the files in `annotations/`, embedded
/// at compile time).
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    for (label, src) in BUILTIN {
        // The embedded files are fixed at compile time and
        // `tests::builtin_files_load` loads each one, so this cannot fail.
        #[allow(clippy::expect_used)]
        registry
            .load_str(src, label)
            .expect("built-in annotation files are valid");
    }
    registry
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// Checking one entry

fn check_op(op: RawOp, loc: &mut Locator) -> Result<(OpSignature, Location), RegistryError> {
    loc.start_entry();
    let name_at = loc.find(&op.name);
    let at = loc.location(name_at, 0);
    if op.name.is_empty() || op.name.chars().any(char::is_whitespace) {
        return Err(RegistryError::Invalid {
            at,
            message: format!("expected an op name without spaces, found '{}'", op.name),
        });
    }
    loc.find(&op.doc);
    if op.annotations.is_empty() {
        return Err(RegistryError::Invalid {
            at,
            message: format!("op '{}' has no annotations; expected at least one", op.name),
        });
    }
    let mut annotations = Vec::new();
    for text in &op.annotations {
        let lit = loc.find(text);
        let anno = parse_annotation(text).map_err(|error| RegistryError::Annotation {
            at: loc.location(lit, char_index(text, error.line, error.col)),
            error,
        })?;
        annotations.push(anno);
    }

    for (i, attr) in op.attrs.iter().enumerate() {
        let lit = loc.find(&attr.name);
        if op.attrs[..i].iter().any(|a| a.name == attr.name) {
            return Err(RegistryError::Invalid {
                at: loc.location(lit, 0),
                message: format!(
                    "attribute '{}' of op '{}' is declared twice; expected unique names",
                    attr.name, op.name
                ),
            });
        }
        if let Some(default) = &attr.default {
            let lit = loc.find(default);
            if !default_parses(attr.kind, default) {
                return Err(RegistryError::Invalid {
                    at: loc.location(lit, 0),
                    message: format!(
                        "expected a default of kind {} for attribute '{}', found '{default}'",
                        attr.kind, attr.name
                    ),
                });
            }
        }
    }

    let flops = match op.flops {
        RawFlops::Profile => FlopsSpec::Profile,
        RawFlops::Formula(text) => {
            let lit = loc.find(&text);
            let formula = Formula::parse(&text).map_err(|e| RegistryError::Formula {
                at: loc.location(lit, e.index),
                expected: e.expected,
                found: e.found,
            })?;
            check_formula_ids(&formula, &annotations, &op.attrs, &op.name, |index| {
                loc.location(lit, index)
            })?;
            FlopsSpec::Formula(formula)
        }
    };

    if let Some(imp) = &op.implementation {
        loc.find(&imp.crate_name);
        let lit = loc.find(&imp.path);
        if !is_rust_path(&imp.path) {
            return Err(RegistryError::Invalid {
                at: loc.location(lit, 0),
                message: format!(
                    "expected a Rust path such as 'my_ops::chunked_ce' as the implementation, found '{}'",
                    imp.path
                ),
            });
        }
        if let Some(dir) = &imp.crate_path {
            loc.find(dir);
        }
    }

    let sig = OpSignature {
        name: op.name,
        doc: op.doc,
        annotations,
        flops,
        attrs: op.attrs,
        implementation: op.implementation,
    };
    Ok((sig, at))
}

fn check_formula_ids(
    formula: &Formula,
    annotations: &[Annotation],
    attrs: &[AttrSpec],
    op: &str,
    at: impl Fn(usize) -> Location,
) -> Result<(), RegistryError> {
    let mut dims: Vec<&str> = Vec::new();
    for anno in annotations {
        for (id, _) in anno.ids() {
            if !dims.contains(&id) {
                dims.push(id);
            }
        }
    }
    for (name, index) in formula.identifiers() {
        if dims.contains(&name) {
            continue;
        }
        match attrs.iter().find(|a| a.name == name) {
            Some(a) if a.kind == AttrKind::Int => {}
            Some(a) => {
                return Err(RegistryError::Invalid {
                    at: at(index),
                    message: format!(
                        "attribute '{name}' is {}; expected a dim or an Int attribute in the flops formula of op '{op}'",
                        a.kind
                    ),
                });
            }
            None => {
                let int_attrs: Vec<&str> = attrs
                    .iter()
                    .filter(|a| a.kind == AttrKind::Int)
                    .map(|a| a.name.as_str())
                    .collect();
                return Err(RegistryError::FormulaIdent {
                    at: at(index),
                    name: name.into(),
                    op: op.into(),
                    expected: format!(
                        "a dim of its annotations ({}) or an Int attribute ({})",
                        or_none(&dims),
                        or_none(&int_attrs)
                    ),
                });
            }
        }
    }
    Ok(())
}

fn or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn default_parses(kind: AttrKind, text: &str) -> bool {
    match kind {
        AttrKind::Int => text.parse::<i64>().is_ok(),
        AttrKind::Float => text.parse::<f64>().is_ok(),
        AttrKind::Bool => text.parse::<bool>().is_ok(),
        AttrKind::Str => true,
    }
}

fn is_rust_path(path: &str) -> bool {
    let is_ident = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    path.split("::").all(is_ident)
}

/// The char index in `text` of 1-based `line` and `col` (clamped to the end).
fn char_index(text: &str, line: usize, col: usize) -> usize {
    let mut index = 0;
    let mut current = 1;
    for c in text.chars() {
        if current == line {
            break;
        }
        index += 1;
        if c == '\n' {
            current += 1;
        }
    }
    index + col.saturating_sub(1)
}

// ---------------------------------------------------------------------------
// Locating strings in the file
//
// serde does not tell where a value was read, so errors inside a string
// (an annotation, a formula) are placed by scanning the file's string
// literals and matching them, in file order, against the values of each
// entry. Entries come in file order, and an entry's strings all lie after
// the previous entry's, which makes the match exact unless one entry holds
// two equal strings (then the first is reported, which is equally right).

/// One string literal of the file: its value and where each char came from.
struct Literal {
    value: String,
    /// The (line, col) of every char of `value`, then of the closing quote.
    positions: Vec<(usize, usize)>,
}

struct Locator {
    file: String,
    literals: Vec<Literal>,
    /// Literals already matched.
    used: Vec<bool>,
    /// The first literal the current entry may match.
    entry_start: usize,
    /// One past the last literal matched so far.
    high: usize,
}

/// A matched literal, by index, or none (then positions fall back to 1:1).
#[derive(Clone, Copy)]
struct LitRef(Option<usize>);

impl Locator {
    fn new(src: &str, file: &str) -> Self {
        let literals = scan_literals(src);
        let used = vec![false; literals.len()];
        Locator {
            file: file.into(),
            literals,
            used,
            entry_start: 0,
            high: 0,
        }
    }

    fn start_entry(&mut self) {
        self.entry_start = self.high;
    }

    /// The first unused literal of the current entry whose value is `value`.
    fn find(&mut self, value: &str) -> LitRef {
        let found = (self.entry_start..self.literals.len())
            .find(|&i| !self.used[i] && self.literals[i].value == value);
        if let Some(i) = found {
            self.used[i] = true;
            self.high = self.high.max(i + 1);
        }
        LitRef(found)
    }

    /// The location of char `index` of a literal's value.
    fn location(&self, lit: LitRef, index: usize) -> Location {
        let (line, col) = lit
            .0
            .and_then(|i| {
                let positions = &self.literals[i].positions;
                positions.get(index).or(positions.last()).copied()
            })
            .unwrap_or((1, 1));
        Location {
            file: self.file.clone(),
            line,
            col,
        }
    }
}

/// Every string literal of a RON file, skipping comments and char literals.
fn scan_literals(src: &str) -> Vec<Literal> {
    let chars: Vec<(char, usize, usize)> = {
        let (mut line, mut col) = (1, 1);
        src.chars()
            .map(|c| {
                let here = (c, line, col);
                if c == '\n' {
                    line += 1;
                    col = 1;
                } else {
                    col += 1;
                }
                here
            })
            .collect()
    };
    let at = |i: usize| chars.get(i).map(|&(c, _, _)| c);
    let pos = |i: usize| {
        chars
            .get(i)
            .map(|&(_, l, c)| (l, c))
            .or_else(|| chars.last().map(|&(_, l, c)| (l, c + 1)))
            .unwrap_or((1, 1))
    };
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut literals = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].0;
        match c {
            '/' if at(i + 1) == Some('/') => {
                while i < chars.len() && chars[i].0 != '\n' {
                    i += 1;
                }
            }
            '/' if at(i + 1) == Some('*') => {
                let mut depth = 0;
                while i < chars.len() {
                    if at(i) == Some('/') && at(i + 1) == Some('*') {
                        depth += 1;
                        i += 2;
                    } else if at(i) == Some('*') && at(i + 1) == Some('/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            '\'' => {
                // A char literal: skip to its closing quote.
                i += 1;
                if at(i) == Some('\\') {
                    i += 1;
                }
                i += 1;
                while i < chars.len() && chars[i].0 != '\'' {
                    i += 1;
                }
                i += 1;
            }
            'r' | 'b' if i == 0 || !is_ident(chars[i - 1].0) => {
                // Raw strings `r"…"`, `r#"…"#` and byte strings `b"…"`.
                let mut j = i + 1;
                if c == 'b' && at(j) == Some('r') {
                    j += 1;
                }
                let raw = c == 'r' || j == i + 2;
                let hashes = (j..).take_while(|&k| at(k) == Some('#')).count();
                if at(j + hashes) == Some('"') && (raw || hashes == 0) {
                    if raw {
                        let start = j + hashes + 1;
                        let mut lit = Literal {
                            value: String::new(),
                            positions: Vec::new(),
                        };
                        let mut k = start;
                        while k < chars.len() {
                            let closes =
                                at(k) == Some('"') && (1..=hashes).all(|h| at(k + h) == Some('#'));
                            if closes {
                                break;
                            }
                            lit.value.push(chars[k].0);
                            lit.positions.push(pos(k));
                            k += 1;
                        }
                        lit.positions.push(pos(k));
                        literals.push(lit);
                        i = k + 1 + hashes;
                    } else {
                        let (lit, next) = scan_quoted(&chars, j, pos);
                        literals.push(lit);
                        i = next;
                    }
                } else {
                    i += 1;
                    while i < chars.len() && is_ident(chars[i].0) {
                        i += 1;
                    }
                }
            }
            '"' => {
                let (lit, next) = scan_quoted(&chars, i, pos);
                literals.push(lit);
                i = next;
            }
            c if is_ident(c) => {
                while i < chars.len() && is_ident(chars[i].0) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    literals
}

/// A `"…"` literal whose opening quote is at `open`; returns it and the
/// index after its closing quote.
fn scan_quoted(
    chars: &[(char, usize, usize)],
    open: usize,
    pos: impl Fn(usize) -> (usize, usize),
) -> (Literal, usize) {
    let mut lit = Literal {
        value: String::new(),
        positions: Vec::new(),
    };
    let mut k = open + 1;
    while k < chars.len() {
        let c = chars[k].0;
        match c {
            '"' => break,
            '\\' => {
                let here = pos(k);
                let esc = chars.get(k + 1).map(|&(c, _, _)| c);
                let (value, len) = match esc {
                    Some('n') => (Some('\n'), 2),
                    Some('t') => (Some('\t'), 2),
                    Some('r') => (Some('\r'), 2),
                    Some('0') => (Some('\0'), 2),
                    Some('\\') => (Some('\\'), 2),
                    Some('"') => (Some('"'), 2),
                    Some('\'') => (Some('\''), 2),
                    Some('u') => {
                        // `\u{XXXX}`
                        let close = (k + 2..chars.len()).find(|&m| chars[m].0 == '}');
                        match close {
                            Some(m) => {
                                let hex: String = chars[k + 3..m].iter().map(|t| t.0).collect();
                                let value =
                                    u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                                (value, m + 1 - k)
                            }
                            None => (None, 2),
                        }
                    }
                    Some('x') => {
                        let hex: String = chars[(k + 2).min(chars.len())..(k + 4).min(chars.len())]
                            .iter()
                            .map(|t| t.0)
                            .collect();
                        let value = u8::from_str_radix(&hex, 16).ok().map(char::from);
                        (value, 4)
                    }
                    Some('\n') => {
                        // A line continuation: skip the newline and the
                        // following whitespace.
                        let mut m = k + 1;
                        while m < chars.len() && chars[m].0.is_whitespace() {
                            m += 1;
                        }
                        (None, m - k)
                    }
                    _ => (None, 2),
                };
                if let Some(v) = value {
                    lit.value.push(v);
                    lit.positions.push(here);
                }
                k += len;
            }
            c => {
                lit.value.push(c);
                lit.positions.push(pos(k));
                k += 1;
            }
        }
    }
    lit.positions.push(pos(k));
    (lit, k + 1)
}

// ---------------------------------------------------------------------------
// Flops formulas

/// A forward-FLOPs formula such as `2 * b * l * k * n`.
#[derive(Clone, Debug, PartialEq)]
pub struct Formula {
    src: String,
    expr: Expr,
}

#[derive(Clone, Debug, PartialEq)]
enum Expr {
    Num(f64),
    /// An identifier, with its char index in the source.
    Var(String, usize),
    Neg(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// A formula syntax error at char `index` of the formula.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormulaError {
    pub index: usize,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for Formula {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.src)
    }
}

impl Formula {
    /// Parses `+ - * /`, parentheses, number literals and identifiers.
    pub fn parse(src: &str) -> Result<Formula, FormulaError> {
        let mut p = FormulaParser {
            chars: src.chars().collect(),
            pos: 0,
            depth: 0,
            operators: 0,
        };
        let expr = p.sum()?;
        p.skip_ws();
        if p.pos < p.chars.len() {
            return Err(p.error("an operator (+ - * /) or the end of the formula"));
        }
        Ok(Formula {
            src: src.into(),
            expr,
        })
    }

    /// The formula as written.
    pub fn source(&self) -> &str {
        &self.src
    }

    /// Every identifier with its char index, in order.
    pub fn identifiers(&self) -> Vec<(&str, usize)> {
        fn walk<'a>(e: &'a Expr, out: &mut Vec<(&'a str, usize)>) {
            match e {
                Expr::Num(_) => {}
                Expr::Var(name, index) => out.push((name, *index)),
                Expr::Neg(inner) => walk(inner, out),
                Expr::Bin(_, a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.expr, &mut out);
        out
    }

    /// The value, with identifiers taken from `binding`, else from `attrs`.
    pub fn eval(
        &self,
        binding: &Binding,
        attrs: &BTreeMap<String, i64>,
    ) -> Result<f64, RegistryError> {
        let err = |message: String| RegistryError::Eval {
            formula: self.src.clone(),
            message,
        };
        fn go(
            e: &Expr,
            binding: &Binding,
            attrs: &BTreeMap<String, i64>,
            err: &dyn Fn(String) -> RegistryError,
        ) -> Result<f64, RegistryError> {
            Ok(match e {
                Expr::Num(v) => *v,
                #[allow(clippy::cast_precision_loss)]
                Expr::Var(name, _) => match (binding.size(name), attrs.get(name)) {
                    (Some(size), _) => size as f64,
                    (None, Some(&value)) => value as f64,
                    (None, None) => {
                        return Err(err(format!(
                            "expected a size or an attribute named '{name}', found neither"
                        )));
                    }
                },
                Expr::Neg(inner) => -go(inner, binding, attrs, err)?,
                Expr::Bin(op, a, b) => {
                    let (a, b) = (go(a, binding, attrs, err)?, go(b, binding, attrs, err)?);
                    match op {
                        BinOp::Add => a + b,
                        BinOp::Sub => a - b,
                        BinOp::Mul => a * b,
                        BinOp::Div if b == 0.0 => {
                            return Err(err("division by zero".into()));
                        }
                        BinOp::Div => a / b,
                    }
                }
            })
        }
        go(&self.expr, binding, attrs, &err)
    }
}

/// How deep parentheses and signs may nest in a formula, and how many
/// operators it may have: the parser, [`Formula::eval`] and the tree's drop
/// recurse over the formula, so an unbounded one would overflow the stack
/// (real formulas have a few of each).
const MAX_FORMULA_DEPTH: usize = 64;
const MAX_FORMULA_OPERATORS: usize = 1024;

struct FormulaParser {
    chars: Vec<char>,
    pos: usize,
    /// Parentheses and signs open around `pos`.
    depth: usize,
    /// Operators read so far.
    operators: usize,
}

impl FormulaParser {
    fn skip_ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.chars.get(self.pos).copied()
    }

    fn error(&mut self, expected: &str) -> FormulaError {
        let found = match self.peek() {
            Some(c) => format!("'{c}'"),
            None => "end of formula".into(),
        };
        FormulaError {
            index: self.pos,
            expected: expected.into(),
            found,
        }
    }

    /// Counts one more operator (binary, or a sign) at `pos`.
    fn operator(&mut self) -> Result<(), FormulaError> {
        self.operators += 1;
        if self.operators > MAX_FORMULA_OPERATORS {
            return Err(self.error(&format!(
                "a formula of at most {MAX_FORMULA_OPERATORS} operators"
            )));
        }
        Ok(())
    }

    /// Opens one more level of nesting (a parenthesis or a sign) at `pos`.
    fn nest(&mut self) -> Result<(), FormulaError> {
        self.depth += 1;
        if self.depth > MAX_FORMULA_DEPTH {
            return Err(self.error(&format!(
                "parentheses and signs nested at most {MAX_FORMULA_DEPTH} deep"
            )));
        }
        Ok(())
    }

    fn sum(&mut self) -> Result<Expr, FormulaError> {
        let mut e = self.product()?;
        loop {
            let op = match self.peek() {
                Some('+') => BinOp::Add,
                Some('-') => BinOp::Sub,
                _ => return Ok(e),
            };
            self.operator()?;
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.product()?));
        }
    }

    fn product(&mut self) -> Result<Expr, FormulaError> {
        let mut e = self.unary()?;
        loop {
            let op = match self.peek() {
                Some('*') => BinOp::Mul,
                Some('/') => BinOp::Div,
                _ => return Ok(e),
            };
            self.operator()?;
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, FormulaError> {
        if self.peek() == Some('-') {
            self.operator()?;
            self.nest()?;
            self.pos += 1;
            let e = Expr::Neg(Box::new(self.unary()?));
            self.depth -= 1;
            return Ok(e);
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, FormulaError> {
        let expected = "a number, an identifier or '('";
        let Some(c) = self.peek() else {
            return Err(self.error(expected));
        };
        let start = self.pos;
        if c == '(' {
            self.nest()?;
            self.pos += 1;
            let e = self.sum()?;
            if self.peek() != Some(')') {
                return Err(self.error("an operator (+ - * /) or ')'"));
            }
            self.pos += 1;
            self.depth -= 1;
            return Ok(e);
        }
        if c.is_ascii_alphabetic() || c == '_' {
            while self
                .chars
                .get(self.pos)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                self.pos += 1;
            }
            let name: String = self.chars[start..self.pos].iter().collect();
            return Ok(Expr::Var(name, start));
        }
        if c.is_ascii_digit() || c == '.' {
            let mut end = self.pos;
            let at = |i: usize| self.chars.get(i).copied();
            while at(end).is_some_and(|c| c.is_ascii_digit() || c == '.') {
                end += 1;
            }
            if matches!(at(end), Some('e' | 'E')) {
                let mut exp = end + 1;
                if matches!(at(exp), Some('+' | '-')) {
                    exp += 1;
                }
                if at(exp).is_some_and(|c| c.is_ascii_digit()) {
                    end = exp;
                    while at(end).is_some_and(|c| c.is_ascii_digit()) {
                        end += 1;
                    }
                }
            }
            let text: String = self.chars[start..end].iter().collect();
            return match text.parse::<f64>() {
                Ok(v) => {
                    self.pos = end;
                    Ok(Expr::Num(v))
                }
                Err(_) => Err(FormulaError {
                    index: start,
                    expected: "a number".into(),
                    found: format!("'{text}'"),
                }),
            };
        }
        Err(self.error(expected))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    const FILE: &str = "ops.ron";

    fn load(src: &str) -> Result<Registry, String> {
        let mut r = Registry::new();
        r.load_str(src, FILE).map_err(|e| e.to_string())?;
        Ok(r)
    }

    fn load_err(src: &str) -> String {
        match load(src) {
            Ok(r) => panic!("loaded {} ops from {src}", r.len()),
            Err(e) => e,
        }
    }

    #[test]
    fn builtin_files_load() {
        // Backs the `expect` in `builtin_registry`.
        for (label, src) in BUILTIN {
            let mut r = Registry::new();
            assert_eq!(r.load_str(src, label), Ok(()), "{label}");
            assert!(!r.is_empty(), "{label} registers no op");
        }
        let registry = builtin_registry();
        let names: Vec<&str> = registry.iter().map(|(n, _, _)| n).collect();
        assert_eq!(
            names,
            [
                "add",
                "attention",
                "cross_entropy",
                "embedding",
                "gelu",
                "layer_norm",
                "linear",
                "linear_bias",
                "mean",
                "merge_heads",
                "pos_embedding",
                "rms_norm",
                "rope",
                "split_heads",
                "swiglu",
            ]
        );
    }

    #[test]
    fn full_entry_loads() {
        let r = load(
            r#"[
    (
        name: "chunked",
        doc: "a custom op",
        annotations: ["b l d^, n^ d^, b l -> b l", "? -> ?"],
        flops: Formula("2 * b * l * d * n / chunk"),
        attrs: [(name: "chunk", kind: Int, default: Some("1024")), (name: "eps", kind: Float)],
        implementation: Some((crate: "my_ops", path: "my_ops::chunked_ce", crate_path: Some("../my_ops"))),
    ),
    (name: "profiled", annotations: ["b -> b"], flops: Profile),
]"#,
        )
        .unwrap();
        let sig = r.get("chunked").unwrap();
        assert_eq!(sig.doc, "a custom op");
        assert_eq!(sig.annotations.len(), 2);
        assert_eq!(sig.annotations[0].to_string(), "b l d^, n^ d^, b l -> b l");
        assert_eq!(
            sig.attrs[0],
            AttrSpec {
                name: "chunk".into(),
                kind: AttrKind::Int,
                default: Some("1024".into()),
            }
        );
        assert_eq!(
            sig.implementation,
            Some(ImplSpec {
                crate_name: "my_ops".into(),
                path: "my_ops::chunked_ce".into(),
                crate_path: Some("../my_ops".into()),
            })
        );
        assert_eq!(r.source("chunked").unwrap().to_string(), "ops.ron:3:16");
        assert_eq!(r.source("profiled").unwrap().to_string(), "ops.ron:10:13");
        // `Some` may be left out.
        let implicit = load(
            "[(name: \"x\", annotations: [\"a -> a\"], flops: Profile, attrs: [(name: \"eps\", kind: Float, default: \"0.1\")], implementation: Some((crate: \"c\", path: \"c::f\", crate_path: \"../c\")))]",
        )
        .unwrap();
        let x = implicit.get("x").unwrap();
        assert_eq!(x.attrs[0].default.as_deref(), Some("0.1"));
        assert_eq!(
            x.implementation
                .as_ref()
                .and_then(|i| i.crate_path.as_deref()),
            Some("../c")
        );
        let profiled = r.get("profiled").unwrap();
        assert_eq!(profiled.flops, FlopsSpec::Profile);
        assert_eq!(profiled.doc, "");
        assert!(profiled.attrs.is_empty() && profiled.implementation.is_none());
        assert_eq!(
            profiled.flops.eval(&Binding::default(), &BTreeMap::new()),
            Ok(None)
        );
    }

    #[test]
    fn ron_errors_point_at_the_file() {
        assert_eq!(
            load_err("[\n  (name: \"x\" annotations: [\"a -> a\"], flops: Profile),\n]"),
            "ops.ron:2:14: expected comma"
        );
        assert_eq!(
            load_err("[(name: \"x\", annotation: [\"a -> a\"], flops: Profile)]"),
            "ops.ron:1:14: unexpected field named `annotation` in `Op`, expected one of `name`, `doc`, `annotations`, `flops`, `attrs`, or `implementation` instead"
        );
        let missing = load_err("[(name: \"x\", annotations: [\"a -> a\"])]");
        assert!(
            missing.starts_with("ops.ron:1:") && missing.contains("missing field named `flops`"),
            "{missing}"
        );
        let variant = load_err("[(name: \"x\", annotations: [\"a -> a\"], flops: Measure)]");
        assert!(
            variant.starts_with("ops.ron:1:") && variant.contains("`Formula`"),
            "{variant}"
        );
        let kind = load_err(
            "[(name: \"x\", annotations: [\"a -> a\"], flops: Profile, attrs: [(name: \"e\", kind: Double)])]",
        );
        assert!(
            kind.starts_with("ops.ron:1:") && kind.contains("`Float`"),
            "{kind}"
        );
    }

    #[test]
    fn bad_annotation_strings_point_into_the_string() {
        let src = "[\n    (\n        name: \"x\",\n        annotations: [\"a b -> a\", \"a b, , c -> a\"],\n        flops: Profile,\n    ),\n]";
        assert_eq!(
            load_err(src),
            "ops.ron:4:41: invalid annotation: expected a dimension, found ','"
        );
        // The error position maps through escapes, raw strings and lines.
        assert_eq!(
            load_err("[(name: \"x\", annotations: [\"\\u{61} b \\\"\"], flops: Profile)]"),
            "ops.ron:1:38: invalid annotation: expected a dimension, ',' or '->', found '\"'"
        );
        assert_eq!(
            load_err("[(name: \"x\", annotations: [r#\"a\nb k+ -> b k^\"#], flops: Profile)]"),
            "ops.ron:2:11: invalid annotation: expected 'k+' like at 2:3, found 'k^'"
        );
        // The same string in an earlier entry does not confuse the locator.
        let src = "[\n (name: \"p\", doc: \"a -> b\", annotations: [\"a -> a\"], flops: Profile),\n (name: \"q\", annotations: [\"a -> b\"], flops: Profile),\n]";
        assert_eq!(
            load_err(src),
            "ops.ron:3:34: invalid annotation: expected an identifier that an input names, or a number, found 'b'"
        );
    }

    proptest::proptest! {
        /// An error inside an annotation string is reported at the file
        /// position of the offending char, across lines of the string.
        #[test]
        fn annotation_errors_map_to_file_positions(text in "[a-c ,()*?^+>\\-\n]{0,20}") {
            let Err(error) = parse_annotation(&text) else {
                return Ok(());
            };
            let src = format!(
                "[\n  (name: \"x\", doc: \"a\nb\", annotations: [\"{text}\"], flops: Profile),\n]"
            );
            // The string's first char is on line 3, after `b", annotations: ["`.
            let (line, col) = if error.line == 1 {
                (3, 19 + error.col)
            } else {
                (2 + error.line, error.col)
            };
            let expected = format!(
                "ops.ron:{line}:{col}: invalid annotation: expected {}, found {}",
                error.expected, error.found
            );
            proptest::prop_assert_eq!(load_err(&src), expected);
        }
    }

    #[test]
    fn formula_errors_point_into_the_string() {
        assert_eq!(
            load_err("[(name: \"x\", annotations: [\"a b -> a\"], flops: Formula(\"2 * a * \"))]"),
            "ops.ron:1:65: invalid flops formula: expected a number, an identifier or '(', found end of formula"
        );
        assert_eq!(
            load_err(
                "[(name: \"x\", annotations: [\"a b -> a\"], flops: Formula(\"2 * (a + b\"))]"
            ),
            "ops.ron:1:67: invalid flops formula: expected an operator (+ - * /) or ')', found end of formula"
        );
        assert_eq!(
            load_err(
                "[(name: \"x\", annotations: [\"a b -> a\"], flops: Formula(\"2 * a * q\"), attrs: [(name: \"h\", kind: Int)])]"
            ),
            "ops.ron:1:65: unknown identifier 'q' in the flops formula of op 'x'; expected a dim of its annotations (a, b) or an Int attribute (h)"
        );
        assert_eq!(
            load_err(
                "[(name: \"x\", annotations: [\"a -> a\"], flops: Formula(\"a * eps\"), attrs: [(name: \"eps\", kind: Float)])]"
            ),
            "ops.ron:1:59: attribute 'eps' is Float; expected a dim or an Int attribute in the flops formula of op 'x'"
        );
    }

    #[test]
    fn schema_rules_point_at_the_entry() {
        assert_eq!(
            load_err("[(name: \"x\", annotations: [], flops: Profile)]"),
            "ops.ron:1:10: op 'x' has no annotations; expected at least one"
        );
        assert_eq!(
            load_err("[(name: \"two words\", annotations: [\"a -> a\"], flops: Profile)]"),
            "ops.ron:1:10: expected an op name without spaces, found 'two words'"
        );
        assert_eq!(
            load_err(
                "[(name: \"x\", annotations: [\"a -> a\"], flops: Profile, attrs: [(name: \"eps\", kind: Float, default: Some(\"small\"))])]"
            ),
            "ops.ron:1:105: expected a default of kind Float for attribute 'eps', found 'small'"
        );
        assert_eq!(
            load_err(
                "[(name: \"x\", annotations: [\"a -> a\"], flops: Profile, attrs: [(name: \"h\", kind: Int), (name: \"h\", kind: Bool)])]"
            ),
            "ops.ron:1:95: attribute 'h' of op 'x' is declared twice; expected unique names"
        );
        assert_eq!(
            load_err(
                "[(name: \"x\", annotations: [\"a -> a\"], flops: Profile, implementation: Some((crate: \"c\", path: \"c::not a path\")))]"
            ),
            "ops.ron:1:96: expected a Rust path such as 'my_ops::chunked_ce' as the implementation, found 'c::not a path'"
        );
    }

    #[test]
    fn duplicates_name_both_places() {
        assert_eq!(
            load_err(
                "[\n (name: \"x\", annotations: [\"a -> a\"], flops: Profile),\n (name: \"x\", annotations: [\"a -> a\"], flops: Profile),\n]"
            ),
            "ops.ron:3:10: op 'x' is already registered by ops.ron:2:10"
        );
        let mut r = builtin_registry();
        let before = r.len();
        let e = r
            .load_str(
                "[(name: \"mine\", annotations: [\"a -> a\"], flops: Profile),\n (name: \"linear\", annotations: [\"a -> a\"], flops: Profile)]",
                "user.ron",
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "user.ron:2:10: op 'linear' is already registered by annotations/linear.ron:5:16"
        );
        // A file that fails registers nothing.
        assert_eq!(r.len(), before);
        assert!(r.get("mine").is_none());
    }

    #[test]
    fn resolve_picks_the_first_matching_alternative() {
        let r = load(
            "[(name: \"mm\", annotations: [\"b m k+, b k+ n -> b m n\", \"m k+, k+ n -> m n\"], flops: Formula(\"2 * m * k * n\"))]",
        )
        .unwrap();
        assert_eq!(
            r.resolve("mm", &[Some(3), Some(3)]).unwrap().to_string(),
            "b m k+, b k+ n -> b m n"
        );
        assert_eq!(
            r.resolve("mm", &[Some(2), Some(2)]).unwrap().to_string(),
            "m k+, k+ n -> m n"
        );
        assert_eq!(
            r.resolve("mm", &[Some(2), None]).unwrap_err().to_string(),
            "op 'mm' (ops.ron:1:10) has no annotation for input ranks [2, -]; expected one of: 'b m k+, b k+ n -> b m n', 'm k+, k+ n -> m n'"
        );
        assert_eq!(
            r.resolve("foo", &[]).unwrap_err().to_string(),
            "unknown op 'foo': no annotation file registers it; add one with --annotations FILE"
        );
    }

    #[test]
    fn load_file_reports_unreadable_files() {
        let mut r = Registry::new();
        let e = r.load_file("/nonexistent/ops.ron").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/ops.ron: cannot read annotation file: "),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.ron");
        std::fs::write(
            &path,
            "[(name: \"x\", annotations: [\"a -> q\"], flops: Profile)]",
        )
        .unwrap();
        let e = r.load_file(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:1:34: invalid annotation: expected an identifier that an input names, or a number, found 'q'",
                path.display()
            )
        );
    }

    #[test]
    fn formulas_evaluate() {
        let binding = Binding {
            sizes: [("b".to_string(), 2), ("l".to_string(), 16)].into(),
            star_rank: 0,
        };
        let attrs: BTreeMap<String, i64> = [("h".to_string(), 4)].into();
        let eval = |src: &str| {
            FlopsSpec::Formula(Formula::parse(src).unwrap())
                .eval(&binding, &attrs)
                .map_err(|e| e.to_string())
        };
        assert_eq!(eval("2 * b * l + h"), Ok(Some(68.0)));
        assert_eq!(eval("2 * (b + l) / 4"), Ok(Some(9.0)));
        assert_eq!(eval("-b - -l"), Ok(Some(14.0)));
        assert_eq!(eval("1.5e1 * b - 0.5"), Ok(Some(29.5)));
        assert_eq!(eval("b - l - h"), Ok(Some(-18.0)));
        assert_eq!(eval("l / b / 2"), Ok(Some(4.0)));
        assert_eq!(
            eval("b / (l - 16)"),
            Err("flops formula 'b / (l - 16)': division by zero".into())
        );
        assert_eq!(
            eval("b * q"),
            Err(
                "flops formula 'b * q': expected a size or an attribute named 'q', found neither"
                    .into()
            )
        );
        let f = Formula::parse("2 * b * l").unwrap();
        assert_eq!(f.identifiers(), vec![("b", 4), ("l", 8)]);
        assert_eq!(f.to_string(), "2 * b * l");
        let e = Formula::parse("2 b").unwrap_err();
        assert_eq!(
            (e.index, e.expected.as_str(), e.found.as_str()),
            (2, "an operator (+ - * /) or the end of the formula", "'b'")
        );
        let e = Formula::parse("1.2.3").unwrap_err();
        assert_eq!((e.index, e.found.as_str()), (0, "'1.2.3'"));
    }
}

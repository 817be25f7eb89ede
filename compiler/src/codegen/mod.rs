//! `codegen`: [`ExecProgram`] → a Rust crate that runs the plan on the runtime.
//!
//! The crate (`OUT/gencode/`) has `Cargo.toml` (depending on
//! `autopart-runtime`, and directly on `torch-sys` so that its `build.rs`
//! can embed an rpath to libtorch), `src/main.rs` (the plan's shape and the
//! stage table, handed to `autopart_runtime::app::main`), `src/blocks.rs`
//! (the parameters and the embed, layer and head blocks as functions that
//! record segments and adapters on a tape) and one `src/stage_<k>.rs` per
//! pipeline stage (its parameters and the chain of blocks of each model
//! chunk). The code reads like the runtime's hand-written llama program:
//! named values, a comment per op naming the traced op and its annotation,
//! no unsafe. Every file starts with an `@generated` line naming the plan
//! (the hash of its `plan.ron`) and the autopart version. The text is laid
//! out by [`writer`] as rustfmt would lay it out (rustfmt is never run), so
//! the same program and options always give the same bytes.

mod emit;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use emit::generate_files;

use crate::anno::AttrSpec;
use crate::lower::ExecProgram;

/// Why code could not be generated or written.
#[derive(Debug, Error)]
pub enum CodegenError {
    #[error("not supported by code generation yet: {0}")]
    Unsupported(String),
    /// The program refers to a value its block does not declare.
    #[error(
        "malformed program: {user} in the {block} block refers to value %{value}, which the block does not declare"
    )]
    UnknownValue {
        block: String,
        user: String,
        value: u32,
    },
    /// An op has fewer inputs than its kind takes.
    #[error("malformed program: {op} ({kind}) has {inputs} inputs; input {index} is missing")]
    MissingInput {
        op: String,
        kind: String,
        index: usize,
        inputs: usize,
    },
    /// An op reads a parameter the program does not declare.
    #[error("malformed program: {op} reads parameter {param}, which the program does not declare")]
    UnknownParam { op: String, param: String },
    #[error("plan hash '{0}' is not 16 hex digits (codegen::plan_hash of plan.ron)")]
    PlanHash(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the generated crate finds its dependencies, and what plan it is
/// generated from.
#[derive(Clone, Debug)]
pub struct CodegenOptions {
    /// [`plan_hash`] of the `plan.ron` the program was lowered from, for the
    /// `@generated` header of every file.
    pub plan_hash: String,
    /// The `autopart-runtime` crate's folder.
    pub runtime_path: PathBuf,
    /// The implementation of every custom op the program uses, by op name.
    pub custom_ops: BTreeMap<String, CustomOpImpl>,
    /// The model's HuggingFace `config.json` (compact JSON), embedded in the
    /// plan binary: `--init-from` checks a folder against it and checkpoints
    /// carry it for `autopart ckpt export --hf`. Empty when unknown.
    pub hf_config: String,
}

pub use autopart_vocab::hash::plan_hash;

/// How generated code calls a custom op: `path(inputs.., attrs..)`, each
/// input a `&Tensor` (this rank's shard), then the op's attributes in their
/// declared order, returning `Result<Tensor, E>` with `ExecError: From<E>`
/// (`tch::TchError` or `autopart_runtime::ops::OpError`).
#[derive(Clone, Debug, PartialEq)]
pub struct CustomOpImpl {
    pub crate_name: String,
    pub path: String,
    /// The crate's folder (a path dependency); `None`: from crates.io.
    pub crate_dir: Option<PathBuf>,
    pub attrs: Vec<AttrSpec>,
}

/// One generated file: a path relative to the crate root and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedFile {
    pub path: String,
    pub text: String,
}

/// The package name of the generated crate: model and a hash of the code,
/// so that crates of different plans never share a binary name in a shared
/// target folder.
pub fn package_name(program: &ExecProgram, files: &[GeneratedFile]) -> String {
    // The `@generated` header (autopart's version, the plan hash) is left
    // out: the same code gets the same name whatever plan numbers or
    // release produced it.
    let mut hasher = autopart_vocab::hash::Fnv1a::new();
    for f in files {
        let body = match f.text.split_once('\n') {
            Some((first, rest)) if first.contains("@generated") => rest,
            _ => f.text.as_str(),
        };
        hasher.write(f.path.as_bytes()).write(body.as_bytes());
    }
    let h = hasher.finish();
    let model: String = program
        .model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("autopart-plan-{model}-{:08x}", h as u32)
}

/// Generates the crate for `program` and writes it under `dir`, replacing
/// what was there (each file written through a temporary and a rename).
/// Returns the package name.
pub fn write_crate(
    program: &ExecProgram,
    options: &CodegenOptions,
    dir: &Path,
) -> Result<String, CodegenError> {
    let (name, files) = generate_files(program, options)?;
    write_files(&files, dir)?;
    Ok(name)
}

/// Writes generated `files` under `dir`, replacing what was there (each file
/// atomically); `.rs` files of `src/` that `files` does not name (stage files
/// of an earlier, longer pipeline) are removed.
pub fn write_files(files: &[GeneratedFile], dir: &Path) -> Result<(), CodegenError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CodegenError::Io { path, source }
    };
    std::fs::create_dir_all(dir.join("src")).map_err(io(&dir.join("src")))?;
    // Stage files of an earlier, longer pipeline must not linger.
    if let Ok(entries) = std::fs::read_dir(dir.join("src")) {
        for e in entries.flatten() {
            let p = e.path();
            let keep = files.iter().any(|f| dir.join(&f.path) == p);
            if !keep && p.extension().is_some_and(|x| x == "rs") {
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
    }
    for f in files {
        let path = dir.join(&f.path);
        // An unchanged file keeps its mtime, so that compiling the same
        // plan again does not rebuild its binary.
        if std::fs::read(&path).is_ok_and(|old| old == f.text.as_bytes()) {
            continue;
        }
        autopart_vocab::fs::write_atomic(&path, f.text.as_bytes()).map_err(io(&path))?;
    }
    Ok(())
}

//! Hand-written programs against the runtime API: the golden examples of what
//! code generation emits. They own the model's math and its partition; they
//! call `exec` for segments and adapters and `schedule` for pipeline order,
//! and never talk to the compiler.

pub mod llama;

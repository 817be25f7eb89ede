//! `autopart-profile`: the machine profiler `autopart profile` starts under
//! the launcher (see `autopart_runtime::profile`).

fn main() -> std::process::ExitCode {
    autopart_runtime::profile::main()
}

//! Embeds an rpath to the z3 shared library the `z3` crate links against
//! (the z3-solver wheel's, see .cargo/config.toml), so `autopart` runs
//! without LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-env-changed=Z3_LIBRARY_PATH_OVERRIDE");
    if let Ok(dir) = std::env::var("Z3_LIBRARY_PATH_OVERRIDE") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

//! Embeds an rpath to libtorch so that the tests of this crate run
//! without `LD_LIBRARY_PATH`. torch-sys exports its library folder through
//! `links = "tch"` as `DEP_TCH_LIBTORCH_LIB`.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}"),
        Err(_) => println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; binaries will need LD_LIBRARY_PATH to find libtorch"
        ),
    }
}

//! The crate links libtorch (through the build.rs rpath, no LD_LIBRARY_PATH) and makes a tensor.

use tch::{Kind, Tensor};

#[test]
fn libtorch_links_and_computes() {
    tch::set_num_threads(1);
    let t = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
    let s = t.sum(Kind::Float).double_value(&[]);
    assert_eq!(s, 15.0);
    assert_eq!(t.size(), vec![2, 3]);
}

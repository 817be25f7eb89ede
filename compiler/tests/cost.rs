//! Loading cluster specs from files through the public API, and the cost
//! primitives as the search will call them.

use std::fs;

use autopart::ir::DType;

use autopart::cost::{
    Cluster, ClusterError, Collective, ComputeKind, LinkLevel, collective_time, compute_time,
    load_cluster, mesh_groups,
};

const A100_RON: &str = include_str!("../clusters/a100-80gb.ron");

fn write_temp(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cluster.ron");
    fs::write(&path, text).expect("write temp cluster");
    let path = path.to_str().expect("temp path is utf-8").to_owned();
    (dir, path)
}

#[test]
fn a_user_file_loads_like_the_preset_it_copies() {
    let (_dir, path) = write_temp(&A100_RON.replace("\"a100-80gb\"", "\"my-a100s\""));
    let cluster = load_cluster(&path).expect("user file loads");
    let preset = load_cluster("a100-80gb").expect("preset loads");
    assert_eq!(cluster.name, "my-a100s");
    assert_eq!(cluster.efficiency, preset.efficiency);
    assert_eq!(cluster.inter_node, preset.inter_node);
}

#[test]
fn a_malformed_file_reports_path_line_and_column() {
    let text = A100_RON.replace("devices_per_node: 8,", "devices_per_node: 8");
    let (_dir, path) = write_temp(&text);
    let err = load_cluster(&path).expect_err("missing comma");
    let message = err.to_string();
    // Line 7 is `peak_flops_per_s: (`, where ron expected a comma or `)`.
    assert!(message.starts_with(&format!("{path}:7:5: ")), "{message}");
    assert!(
        matches!(
            err,
            ClusterError::Parse {
                line: 7,
                col: 5,
                ..
            }
        ),
        "{message}"
    );
}

#[test]
fn a_missing_field_is_named() {
    let text = A100_RON.replace("hbm_bytes_per_s: 2.039e12,", "");
    let (_dir, path) = write_temp(&text);
    let message = load_cluster(&path).expect_err("missing field").to_string();
    assert!(message.starts_with(&path), "{message}");
    assert!(message.contains("hbm_bytes_per_s"), "{message}");
}

#[test]
fn an_invalid_file_names_the_field() {
    let text = A100_RON.replace("collective: 0.8,", "collective: 1.5,");
    let (_dir, path) = write_temp(&text);
    let message = load_cluster(&path).expect_err("efficiency > 1").to_string();
    assert_eq!(
        message,
        format!("{path}: invalid cluster: `efficiency.collective` must be in (0, 1], got 1.5")
    );
}

#[test]
fn a_missing_file_is_a_read_error_naming_it() {
    let err = load_cluster("no/such/cluster.ron").expect_err("no file");
    assert!(matches!(err, ClusterError::Read { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("cannot read cluster file no/such/cluster.ron: "),
        "{err}"
    );
}

#[test]
fn an_unknown_name_lists_the_presets() {
    let message = load_cluster("v100").expect_err("unknown").to_string();
    for preset in ["a100-80gb", "h100", "h200", "mi300x", "trn1", "cpu"] {
        assert!(message.contains(preset), "{message}");
    }
}

#[test]
fn a_llama_layer_step_on_a100s_adds_up() {
    // One Llama 3 8B MLP up-projection per micro-batch of 8192 tokens with
    // tp = 8: 2 · 8192 · 4096 · 14336 / 8 FLOP = 1.2025e11 FLOP at
    // 312e12 · 0.65 FLOP/s (the calibrated matmul factor) = 0.5930 ms; then
    // the tp all-reduce of the 8192 · 4096
    // bf16 activations (64 MiB) in the node: 2·7/8 · 2^26 / 240e9 + 28 us
    // = 0.5173 ms.
    let cluster: Cluster = load_cluster("a100-80gb").expect("preset loads");
    let flops = 2.0 * 8192.0 * 4096.0 * 14336.0 / 8.0;
    let bytes = 2.0 * (8192.0 * 4096.0 + 4096.0 * 14336.0 / 8.0 + 8192.0 * 14336.0 / 8.0);
    let matmul_s = compute_time(&cluster, flops, bytes, ComputeKind::Matmul, DType::Bf16);
    assert_eq!(cluster.efficiency.matmul, 0.65);
    assert!((matmul_s - 0.5930e-3).abs() < 1e-7, "{matmul_s}");

    let groups = mesh_groups(&cluster, &[8, 8]);
    assert_eq!(groups[0].level(), LinkLevel::IntraNode);
    assert_eq!(groups[1].level(), LinkLevel::InterNode);
    let activations_bytes = 8192.0 * 4096.0 * 2.0;
    let comm_s = collective_time(
        &cluster,
        Collective::AllReduce,
        &groups[0],
        activations_bytes,
    );
    assert!((comm_s - 0.5173e-3).abs() < 1e-7, "{comm_s}");
}

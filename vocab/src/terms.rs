//! The plan's closed enums.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The pipeline schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Schedule {
    /// Every forward, then every backward (activations of all micro-batches
    /// live at once).
    GPipe,
    /// One forward, one backward (PipeDream-flush, Megatron's default): at
    /// most `stages - stage` micro-batches in flight.
    OneFOneB,
    /// Megatron's interleaved 1F1B: each stage holds `chunks` model chunks
    /// (stage `s` holds virtual stages `s`, `s + stages`, …); needs a
    /// multiple of `stages` micro-batches.
    Interleaved { chunks: u32 },
}

impl Schedule {
    /// Model chunks per stage: `chunks` for interleaved, else 1.
    pub fn chunks(self) -> u32 {
        match self {
            Schedule::Interleaved { chunks } => chunks,
            Schedule::GPipe | Schedule::OneFOneB => 1,
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::GPipe => f.write_str("gpipe"),
            Schedule::OneFOneB => f.write_str("1f1b"),
            Schedule::Interleaved { chunks } => write!(f, "interleaved-{chunks}"),
        }
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            _ => s
                .strip_prefix("interleaved-")
                .or_else(|| s.strip_prefix("interleaved"))
                .and_then(|v| {
                    if v.is_empty() {
                        Some(2)
                    } else {
                        v.parse().ok()
                    }
                })
                .filter(|&chunks| chunks >= 2)
                .map(|chunks| Schedule::Interleaved { chunks })
                .ok_or_else(|| {
                    format!(
                        "unknown schedule '{s}' (expected gpipe, 1f1b or interleaved-V with V >= 2)"
                    )
                }),
        }
    }
}

/// Activation recompute of a stage's layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Recompute {
    /// Keep every activation backward needs.
    None,
    /// Recompute the attention core (scores, softmax) in backward.
    Selective,
    /// Keep only each layer's input; recompute the layer in backward.
    Full,
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        })
    }
}

impl FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Recompute::None),
            "selective" => Ok(Recompute::Selective),
            "full" => Ok(Recompute::Full),
            _ => Err(format!(
                "unknown recompute mode '{s}' (expected none, selective or full)"
            )),
        }
    }
}

/// The ZeRO stage: what data parallelism shards (DeepSpeed's numbering).
/// `plan.ron` writes it as its number (`zero: 1`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(try_from = "u8", into = "u8")]
pub enum ZeroStage {
    /// 0: every dp rank holds every parameter, gradient and optimizer state.
    #[default]
    Off,
    /// 1: optimizer state (f32 master weights and moments) sharded over dp.
    One,
    /// 2: optimizer state and gradients sharded over dp.
    Two,
    /// 3: optimizer state, gradients and parameters sharded over dp.
    Three,
}

impl ZeroStage {
    /// Every stage, in order.
    pub const ALL: [ZeroStage; 4] = [
        ZeroStage::Off,
        ZeroStage::One,
        ZeroStage::Two,
        ZeroStage::Three,
    ];

    /// DeepSpeed's number of the stage.
    pub fn number(self) -> u8 {
        match self {
            ZeroStage::Off => 0,
            ZeroStage::One => 1,
            ZeroStage::Two => 2,
            ZeroStage::Three => 3,
        }
    }

    /// Whether the optimizer state is sharded over dp (stage 1 and above).
    pub fn shards_optimizer(self) -> bool {
        self >= ZeroStage::One
    }

    /// Whether gradients are sharded over dp (stage 2 and above).
    pub fn shards_gradients(self) -> bool {
        self >= ZeroStage::Two
    }

    /// Whether parameters are sharded over dp between uses (stage 3).
    pub fn shards_parameters(self) -> bool {
        self == ZeroStage::Three
    }

    /// What the stage shards, for reports.
    pub fn description(self) -> &'static str {
        match self {
            ZeroStage::Off => "nothing sharded",
            ZeroStage::One => "optimizer state sharded over dp",
            ZeroStage::Two => "optimizer state and gradients sharded over dp",
            ZeroStage::Three => "optimizer state, gradients and parameters sharded over dp",
        }
    }
}

impl TryFrom<u8> for ZeroStage {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            0 => Ok(ZeroStage::Off),
            1 => Ok(ZeroStage::One),
            2 => Ok(ZeroStage::Two),
            3 => Ok(ZeroStage::Three),
            _ => Err(format!(
                "zero stage {n} does not exist (expected 0, 1, 2 or 3)"
            )),
        }
    }
}

impl From<ZeroStage> for u8 {
    fn from(z: ZeroStage) -> u8 {
        z.number()
    }
}

impl fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

impl FromStr for ZeroStage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n: u8 = s
            .trim()
            .parse()
            .map_err(|_| format!("unknown ZeRO stage '{s}' (expected 0, 1, 2 or 3)"))?;
        ZeroStage::try_from(n)
    }
}

/// The dtype a plan trains in (parameters and activations). `plan.ron`
/// writes it as its name (`dtype: "bf16"`, `"f32"`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub enum DType {
    #[default]
    Bf16,
    Fp16,
    Fp32,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::Bf16 | DType::Fp16 => 2,
            DType::Fp32 => 4,
        }
    }

    /// The name `plan.ron` and reports use (`bf16`, `f16`, `f32`, as the
    /// compiler's graph names element types); parsing also takes `fp16`
    /// and `fp32`, the flags' spelling.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::Fp16 => "f16",
            DType::Fp32 => "f32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(DType::Bf16),
            "fp16" | "f16" => Ok(DType::Fp16),
            "fp32" | "f32" => Ok(DType::Fp32),
            other => Err(format!(
                "unknown dtype '{other}' (expected bf16, fp16 or fp32)"
            )),
        }
    }
}

impl TryFrom<String> for DType {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DType> for String {
    fn from(d: DType) -> String {
        d.name().to_string()
    }
}

/// Where tensors live at run time.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub enum Device {
    /// Host memory; collectives over MPI.
    #[default]
    Cpu,
    /// One CUDA device per rank; collectives over NCCL.
    Cuda,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            other => Err(format!("unknown device '{other}' (expected cpu or cuda)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        for s in [
            Schedule::GPipe,
            Schedule::OneFOneB,
            Schedule::Interleaved { chunks: 3 },
        ] {
            assert_eq!(s.to_string().parse::<Schedule>(), Ok(s));
        }
        assert_eq!(
            "interleaved".parse::<Schedule>(),
            Ok(Schedule::Interleaved { chunks: 2 })
        );
        assert!("interleaved-1".parse::<Schedule>().is_err());
        for r in [Recompute::None, Recompute::Selective, Recompute::Full] {
            assert_eq!(r.to_string().parse::<Recompute>(), Ok(r));
        }
        for z in ZeroStage::ALL {
            assert_eq!(z.to_string().parse::<ZeroStage>(), Ok(z));
            assert_eq!(ZeroStage::try_from(z.number()), Ok(z));
        }
        assert!(
            "4".parse::<ZeroStage>()
                .expect_err("rejected")
                .contains("expected 0, 1, 2 or 3")
        );
        for d in [DType::Bf16, DType::Fp16, DType::Fp32] {
            assert_eq!(d.to_string().parse::<DType>(), Ok(d));
        }
        assert_eq!("f32".parse::<DType>(), Ok(DType::Fp32));
        assert!(
            "int8"
                .parse::<DType>()
                .expect_err("rejected")
                .contains("int8")
        );
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda));
    }

    #[test]
    fn zero_stages_say_what_they_shard() {
        assert!(!ZeroStage::Off.shards_optimizer());
        assert!(ZeroStage::One.shards_optimizer() && !ZeroStage::One.shards_gradients());
        assert!(ZeroStage::Two.shards_gradients() && !ZeroStage::Two.shards_parameters());
        assert!(ZeroStage::Three.shards_parameters());
    }
}

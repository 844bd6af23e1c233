//! The element types a checkpoint may hold, and their conversion to f32.

use half::{bf16, f16};

/// Element types a checkpoint may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// One little-endian element as f32 (`b` is exactly `size()` bytes).
    pub(super) fn to_f32(self, b: &[u8]) -> f32 {
        let a2 = || [b[0], b[1]];
        let a4 = || [b[0], b[1], b[2], b[3]];
        let a8 = || [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
        match self {
            DType::F64 => f64::from_le_bytes(a8()) as f32,
            DType::F32 => f32::from_le_bytes(a4()),
            DType::F16 => f16::from_le_bytes(a2()).to_f32(),
            DType::BF16 => bf16::from_le_bytes(a2()).to_f32(),
            DType::I64 => i64::from_le_bytes(a8()) as f32,
            DType::I32 => i32::from_le_bytes(a4()) as f32,
            DType::I16 => i16::from_le_bytes(a2()) as f32,
            DType::I8 => b[0] as i8 as f32,
            DType::U8 | DType::Bool => f32::from(b[0]),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_conversion() {
        assert_eq!(DType::F16.to_f32(&f16::from_f32(1.5).to_le_bytes()), 1.5);
        assert_eq!(
            DType::BF16.to_f32(&bf16::from_f32(-2.0).to_le_bytes()),
            -2.0
        );
        assert_eq!(DType::I64.to_f32(&(-7i64).to_le_bytes()), -7.0);
        assert_eq!(DType::I8.to_f32(&[0xff]), -1.0);
    }
}

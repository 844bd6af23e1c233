//! KServe tensors to our images and logits to KServe tensors: shape and datatype checks,
//! `raw_input_contents` (little-endian, row-major; BYTES as 4-byte length + data) or typed
//! `contents`, or a window of a registered system shared-memory region (the tensor
//! parameters `shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`);
//! requested outputs, and the classification extension.
//!
//! The request's inputs are read in `inputs`, the outputs it asks for and their
//! encoding in `outputs`; this module holds what both read: the tensor parameters
//! (integers, a shared-memory window) and the raw BYTES layout.

mod inputs;
mod outputs;

use std::collections::HashMap;

use prost::bytes::Bytes;

use crate::api::error::ServeError;
use crate::proto::inference::{infer_parameter::ParameterChoice, InferParameter};

pub use inputs::images;
pub use outputs::{encode, requested, OutputRequest, SharedOutput};

fn bad(message: String) -> ServeError {
    ServeError::InvalidArgument(message)
}

/// A tensor's place in a registered shared-memory region, from its parameters.
struct SharedWindow {
    region: String,
    offset: u64,
    byte_size: u64,
}

fn shared_window(
    tensor: &str,
    params: &HashMap<String, InferParameter>,
) -> Result<Option<SharedWindow>, ServeError> {
    let Some(p) = params.get("shared_memory_region") else {
        return Ok(None);
    };
    let Some(ParameterChoice::StringParam(region)) = &p.parameter_choice else {
        return Err(bad(format!(
            "'{tensor}': parameter 'shared_memory_region' must be a string"
        )));
    };
    let unsigned = |key: &str| -> Result<Option<u64>, ServeError> {
        integer(params, key)?
            .map(|v| {
                u64::try_from(v).map_err(|_| {
                    bad(format!(
                        "'{tensor}': parameter '{key}' must not be negative"
                    ))
                })
            })
            .transpose()
    };
    let byte_size = unsigned("shared_memory_byte_size")?.ok_or_else(|| {
        bad(format!(
            "'{tensor}': 'shared_memory_region' needs 'shared_memory_byte_size'"
        ))
    })?;
    Ok(Some(SharedWindow {
        region: region.clone(),
        offset: unsigned("shared_memory_offset")?.unwrap_or(0),
        byte_size,
    }))
}

/// KServe's raw BYTES layout: each element a little-endian u32 length, then its bytes.
/// The elements are slices of `b`, not copies; more than `max` of them (the batch the
/// shape declares) is refused as soon as it shows, not after splitting them all.
fn split_bytes(b: &Bytes, max: usize) -> Result<Vec<Bytes>, ServeError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        if out.len() == max {
            return Err(bad(format!(
                "raw BYTES data holds more than the {max} elements its shape declares"
            )));
        }
        let Some(len) = b.get(at..at + 4) else {
            return Err(bad("raw BYTES data ends inside an element's length".into()));
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let start = at + 4;
        if b.len() - start < len {
            return Err(bad(format!(
                "raw BYTES element of {len} bytes runs past the data ({} left)",
                b.len() - start
            )));
        }
        out.push(b.slice(start..start + len));
        at = start + len;
    }
    Ok(out)
}

fn join_bytes<'a>(elements: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

fn int_param(p: &InferParameter) -> Option<i128> {
    match p.parameter_choice.as_ref()? {
        ParameterChoice::Int64Param(v) => Some(i128::from(*v)),
        ParameterChoice::Uint64Param(v) => Some(i128::from(*v)),
        _ => None,
    }
}

/// An integer request or output parameter, if present.
pub fn integer(
    params: &HashMap<String, InferParameter>,
    key: &str,
) -> Result<Option<i128>, ServeError> {
    match params.get(key) {
        None => Ok(None),
        Some(p) => int_param(p)
            .map(Some)
            .ok_or_else(|| bad(format!("parameter '{key}' must be an integer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_round_trip_and_truncation_is_an_error() {
        let joined = Bytes::from(join_bytes([&b"ab"[..], b"", b"xyz"].into_iter()));
        assert_eq!(
            split_bytes(&joined, 10).ok(),
            Some(vec![
                Bytes::from_static(b"ab"),
                Bytes::new(),
                Bytes::from_static(b"xyz")
            ])
        );
        assert!(split_bytes(&joined.slice(..joined.len() - 1), 10).is_err());
        assert!(split_bytes(&Bytes::from_static(&[1, 0]), 10).is_err());
    }
}

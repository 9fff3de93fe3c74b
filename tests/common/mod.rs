//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gpu;

use std::path::{Path, PathBuf};

use mcdm::weights::{SafetensorsFile, StorageDtype};

/// `tests/fixtures/<sub>`, or `$MCDM_FIXTURES/<sub>` for test executables run away from the
/// checkout they were built in (scripts/device-check.sh).
pub fn fixtures(sub: &str) -> PathBuf {
    std::env::var_os("MCDM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(sub)
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    assert!(
        den > 0.0,
        "reference is all zeros: the test would prove nothing"
    );
    (num / den).sqrt()
}

/// A float tensor stored as f32 / i64 in a fixture, as f32.
pub fn read_f32(file: &SafetensorsFile, name: &str) -> Vec<f32> {
    match file.dtype(name).unwrap() {
        StorageDtype::I64 => file
            .i64(name)
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        _ => file.f32(name).unwrap(),
    }
}

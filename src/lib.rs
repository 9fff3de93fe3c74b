//! mcdm: multi-modal composition of guided-diffusion models.
//!
//! Several diffusion experts, each conditioned on its own modality, are combined at every
//! sampling step into one product of experts (Nair et al., eq. 12):
//! `eps = eps_u + sum_i w_i (eps_i - eps_u)`.

pub mod backend;
pub mod bench;
pub mod config;
pub mod cuda;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod files;
pub mod image;
pub mod job;
pub mod memory;
pub mod model;
pub mod ops;
pub mod rng;
pub mod sample;
pub mod text;
pub mod weights;

pub use device::{DType, Device};
pub use error::{Error, Result};

/// The README's Rust example, compiled and run by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Says that the unit test `check` cannot run here and why: a skip message, or a failure under
/// `MCDM_REQUIRE_ALL_CHECKS=1` (`.ci/run`), as `tests/common`'s `skip` does for the
/// integration tests.
#[cfg(test)]
pub(crate) fn skip_check(check: &str, why: &str) {
    assert!(
        std::env::var("MCDM_REQUIRE_ALL_CHECKS").map_or(true, |v| v != "1"),
        "{check}: cannot run: {why} (MCDM_REQUIRE_ALL_CHECKS=1 requires every check)"
    );
    eprintln!("{check}: skipped, {why}");
}

//! Timestep respacing (`respace.space_timesteps`).

use std::collections::BTreeSet;

use super::check_diffusion_steps;
use crate::error::{Error, Result};

/// The original timesteps kept by `spec`, sorted ascending.
///
/// `spec` is `""` (all `num_timesteps` steps), `"N"`, comma-separated section counts such as
/// `"10,10,5"` (the chain is cut into equal sections, the first `num_timesteps % sections` one
/// step longer, and each is strided to its count with the reference's round-half-even), or
/// `"ddimN"` (the smallest integer stride that gives exactly N steps). Numbers are read like
/// Python's `int` (surrounding whitespace, a sign and digit-separating underscores allowed).
///
/// Errors where the reference raises: an unparsable number, a section asking for more steps
/// than it has, a `ddimN` no integer stride gives exactly, and a spec that keeps no step at
/// all (the reference accepts it here but fails when building the diffusion).
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> Result<Vec<usize>> {
    check_diffusion_steps(num_timesteps)?;
    if spec.is_empty() {
        return Ok((0..num_timesteps).collect());
    }
    let steps = if let Some(count) = spec.strip_prefix("ddim") {
        let desired = parse_int(count, spec)?;
        let stride = (1..num_timesteps)
            .find(|&s| i64::try_from(num_timesteps.div_ceil(s)) == Ok(desired))
            .ok_or_else(|| {
                Error::Diffusion(format!(
                    "timestep_respacing `{spec}`: no integer stride gives exactly {desired} of \
                     {num_timesteps} steps"
                ))
            })?;
        (0..num_timesteps).step_by(stride).collect()
    } else {
        let counts = spec
            .split(',')
            .map(|s| parse_int(s, spec))
            .collect::<Result<Vec<i64>>>()?;
        sections(num_timesteps, &counts, spec)?
    };
    if steps.is_empty() {
        return Err(Error::Diffusion(format!(
            "timestep_respacing `{spec}` keeps no step"
        )));
    }
    Ok(steps)
}

/// The section striding of the reference; `counts` may hold zero or negative entries, which
/// (as there) take no step.
fn sections(num_timesteps: usize, counts: &[i64], spec: &str) -> Result<Vec<usize>> {
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0usize;
    let mut steps = BTreeSet::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if (size as i64) < count {
            return Err(Error::Diffusion(format!(
                "timestep_respacing `{spec}`: cannot divide a section of {size} steps into {count}"
            )));
        }
        let frac_stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        // Accumulated like the reference (repeated addition, then Python's round half to even),
        // so that the kept steps agree exactly.
        let mut cur = 0.0f64;
        for _ in 0..count.max(0) {
            steps.insert(start + cur.round_ties_even() as usize);
            cur += frac_stride;
        }
        start += size;
    }
    Ok(steps.into_iter().collect())
}

/// Parses an integer the way Python's `int(str)` does (base 10).
fn parse_int(s: &str, spec: &str) -> Result<i64> {
    let bad = || {
        Error::Diffusion(format!(
            "timestep_respacing `{spec}`: `{s}` is not an integer"
        ))
    };
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    let well_formed = !digits.is_empty()
        && !digits.starts_with('_')
        && !digits.ends_with('_')
        && !digits.contains("__")
        && digits.chars().all(|c| c.is_ascii_digit() || c == '_');
    if !well_formed {
        return Err(bad());
    }
    t.replace('_', "")
        .parse()
        .map_err(|_| Error::Diffusion(format!("timestep_respacing `{spec}`: `{s}` is too large")))
}

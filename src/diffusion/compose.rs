//! Composition of expert noise predictions into one product of experts.

/// `out = eps_u + sum_i w_i (eps_i - eps_u)`, elementwise (Nair et al. eq. 12 with weights).
///
/// With every `w_i = 1` this is eq. 12 itself, `sum_i eps_i - (N - 1) eps_u`; a negative
/// weight negates an expert, and a single expert with `w > 1` is classifier-free guidance.
/// Per element the terms are added in expert order, each as `acc + w_i * (eps_i - eps_u)`
/// (no fused multiply-add), which a GPU port should follow for identical results.
///
/// # Panics
/// If `outputs` and `weights` differ in length, or any slice differs in length from `uncond`.
pub fn compose(outputs: &[&[f32]], weights: &[f32], uncond: &[f32], out: &mut [f32]) {
    assert_eq!(
        outputs.len(),
        weights.len(),
        "compose: one weight per expert output"
    );
    assert_eq!(
        out.len(),
        uncond.len(),
        "compose: out and uncond lengths differ"
    );
    for (k, o) in outputs.iter().enumerate() {
        assert_eq!(
            o.len(),
            uncond.len(),
            "compose: expert {k} has the wrong length"
        );
    }
    out.copy_from_slice(uncond);
    for (eps, &w) in outputs.iter().zip(weights) {
        for ((o, &e), &u) in out.iter_mut().zip(eps.iter()).zip(uncond) {
            *o += w * (e - u);
        }
    }
}

//! Sinusoidal timestep embedding, guided-diffusion's `timestep_embedding`: **[cos | sin]**.

/// Writes `[t.len(), dim]`; the f32 operation order follows the reference so that fractional and
/// large timesteps give the same values.
pub fn timestep_embedding(t: &[f32], dim: usize, out: &mut [f32]) {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    for (row, &tv) in out.chunks_exact_mut(dim).zip(t) {
        for i in 0..half {
            let freq = (log_period * i as f32 / half as f32).exp();
            let arg = tv * freq;
            row[i] = arg.cos();
            row[half + i] = arg.sin();
        }
        if dim % 2 == 1 {
            row[dim - 1] = 0.0;
        }
    }
}

//! Beta schedules (`get_named_beta_schedule`), in f64 with the reference's order of operations.

use super::NoiseSchedule;

/// The betas of the named schedule for `num_timesteps` steps.
///
/// Linear: Ho et al.'s 1e-4 .. 0.02, scaled by `1000 / num_timesteps` so that longer or shorter
/// chains keep the same overall noise. Cosine: Nichol & Dhariwal's `alpha_bar(t) =
/// cos²((t + 0.008) / 1.008 · π/2)`, with betas capped at 0.999.
pub fn beta_schedule(schedule: NoiseSchedule, num_timesteps: usize) -> Vec<f64> {
    match schedule {
        NoiseSchedule::Linear => {
            let scale = 1000.0 / num_timesteps as f64;
            linspace(scale * 0.0001, scale * 0.02, num_timesteps)
        }
        NoiseSchedule::Cosine => betas_for_alpha_bar(num_timesteps, 0.999, |t| {
            let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
            c * c
        }),
    }
}

/// `np.linspace(start, stop, n)`: `i * step + start` with the last value set to `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![start; n];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut y: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// Betas that discretise a cumulative `alpha_bar` on [0, 1]: `1 - alpha_bar(t2) / alpha_bar(t1)`.
fn betas_for_alpha_bar(n: usize, max_beta: f64, alpha_bar: impl Fn(f64) -> f64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta)
        })
        .collect()
}

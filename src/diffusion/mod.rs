//! Diffusion schedules, timestep respacing and the DDPM / DDIM updates.

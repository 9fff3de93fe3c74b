//! Composed sampling on the GPU: the state, conditions and eps predictions stay on the device;
//! each step packs the inputs of every model group, runs its batched forward pass, unpacks the
//! eps (and the unconditional variance) and applies the fused combine-and-update kernel with
//! in-kernel Philox noise. The host only enqueues work: once a step has run without allocating
//! (usually the second), the models' work of each later step is one CUDA graph launch.

use cudarc::driver::CudaSlice;

use super::{check_finite, run_in_batches, ComposedSampler, StepProgress, INIT_NOISE_STEP};
use crate::cuda::{Gpu, GpuBuffer, GpuFloat, GpuGraph};
use crate::error::{Error, Result};
use crate::model::{GpuConditioning, GpuUNet, GpuWorkspace};
use crate::ops::layout::{pack_input_gpu, unpack_output_gpu};
use crate::ops::step::{diffusion_step_gpu, fill_normals_gpu};
use crate::sample::SamplerKind;

/// Per-batch device copies of one model group's conditions.
struct GroupInputs {
    labels: Option<CudaSlice<i64>>,
    embedding: Option<GpuBuffer<f32>>,
}

impl ComposedSampler<'_> {
    /// [`ComposedSampler::sample`] on the GPU. `models[m]` is model `m` uploaded
    /// ([`GpuUNet::upload`]). A batch that does not fit in GPU memory is run again at half the
    /// size (the progress reports show the batch size used).
    pub fn sample_gpu<T: GpuFloat>(
        &self,
        models: &[GpuUNet<T>],
        num_samples: usize,
        batch_size: usize,
        init_noise: Option<&[f32]>,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<Vec<f32>> {
        if models.len() != self.models.len() {
            return Err(Error::Input(format!(
                "{} GPU models for {} models",
                models.len(),
                self.models.len()
            )));
        }
        // The conditions were checked against `self.models`: the uploads must be those models,
        // on one device handle (one stream: another handle's launches would escape the graphs).
        if let Some(m) = (0..models.len()).find(|&m| !models[m].is_upload_of(&self.models[m].unet))
        {
            return Err(Error::Input(format!(
                "GPU model {m} is not an upload of model {m} ({})",
                self.models[m].file.path().display()
            )));
        }
        if models
            .iter()
            .any(|m| !std::sync::Arc::ptr_eq(m.gpu(), models[0].gpu()))
        {
            return Err(Error::Input(
                "the GPU models were uploaded through different device handles: use one".into(),
            ));
        }
        let gpu: &Gpu = models
            .first()
            .map(|m| &**m.gpu())
            .ok_or_else(|| Error::Input("no models".into()))?;
        let len = self.image_len();
        self.check_request(num_samples, batch_size, init_noise)?;
        // Image conditions and weights go up once for the whole run.
        let images: Vec<Option<(GpuBuffer<f32>, usize)>> = self
            .terms
            .iter()
            .map(|(_, c)| {
                c.image
                    .as_ref()
                    .map(|img| Ok((gpu.upload::<f32>(&img.data)?, img.count)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let weights = gpu.upload::<f32>(&if self.weights.is_empty() {
            vec![0.0]
        } else {
            self.weights.clone()
        })?;
        let mut ws = GpuWorkspace::<T>::default();
        let mut samples = self.samples_buffer(num_samples)?;
        run_in_batches(num_samples, batch_size, |first, b| {
            let x = match init_noise {
                Some(x) => gpu.upload::<f32>(&x[first * len..(first + b) * len])?,
                None => {
                    let mut x = gpu.zeros::<f32>(b * len)?;
                    fill_normals_gpu(gpu, &mut x, b, len, first, self.spec.seed, INIT_NOISE_STEP)?;
                    x
                }
            };
            let mut progress = StepProgress::new(first, b, self.num_steps());
            let out = self
                .sample_batch_gpu(
                    gpu,
                    models,
                    &images,
                    &weights,
                    first,
                    x,
                    b,
                    &mut ws,
                    &mut || on_step(progress.next()),
                )
                .inspect_err(|e| {
                    // Frees the buffers sized for the batch that did not fit before the retry.
                    if matches!(e, Error::OutOfMemory { .. }) {
                        ws = GpuWorkspace::default();
                    }
                })?;
            samples.extend_from_slice(&out);
            Ok(())
        })?;
        check_finite(&samples, len)?;
        Ok(samples)
    }

    /// One batch, every step: launch by launch until a step allocated nothing (the first sizes
    /// the workspace; best fit may need a second), then, unless [`Gpu::cuda_graphs`] is off, by
    /// replaying the models' work of the next step, recorded once as a CUDA graph. The buffers
    /// that work touches keep their addresses: the state is updated in place and each step's
    /// timesteps are copied into one buffer per group.
    #[allow(clippy::too_many_arguments)]
    fn sample_batch_gpu<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        models: &[GpuUNet<T>],
        images: &[Option<(GpuBuffer<f32>, usize)>],
        weights: &GpuBuffer<f32>,
        first: usize,
        x: GpuBuffer<f32>,
        b: usize,
        ws: &mut GpuWorkspace<T>,
        on_step: &mut dyn FnMut(),
    ) -> Result<Vec<f32>> {
        let len = self.image_len();
        let hw = self.spec.height * self.spec.width;
        let terms = self.terms.len();
        // Labels and embeddings per group row, for this batch: uploaded once, used every step.
        let conditions: Vec<GroupInputs> = self
            .groups
            .iter()
            .map(|(m, rows)| {
                let (labels, embedding) = self.group_conditions(*m, rows, first, b);
                let labels = labels.map(|y| gpu.upload_raw(&y)).transpose()?;
                let embedding = embedding.map(|e| gpu.upload::<f32>(&e)).transpose()?;
                Ok(GroupInputs { labels, embedding })
            })
            .collect::<Result<_>>()?;
        let steps = self.num_steps();
        // Per group, every step's timestep for each of its rows: step i at `i * rows`.
        let timesteps: Vec<GpuBuffer<f32>> = self
            .groups
            .iter()
            .map(|(_, rows)| {
                let per_step = (0..steps).flat_map(|i| {
                    std::iter::repeat_n(self.diffusion.model_timestep(i), rows.len() * b)
                });
                gpu.upload::<f32>(&per_step.collect::<Vec<_>>())
            })
            .collect::<Result<_>>()?;
        let mut state = BatchState {
            x,
            eps: gpu.zeros::<f32>(terms * b * len)?,
            var: if self.learned_variance {
                Some(gpu.zeros::<f32>(b * len)?)
            } else {
                None
            },
            inputs: self
                .groups
                .iter()
                .map(|(m, rows)| {
                    gpu.zeros::<T>(rows.len() * b * hw * models[*m].config().in_channels)
                })
                .collect::<Result<_>>()?,
            timesteps: self
                .groups
                .iter()
                .map(|(_, rows)| gpu.zeros::<f32>(rows.len() * b))
                .collect::<Result<_>>()?,
            conditions,
        };
        // SAFETY of each launch below: the graph records the model work of one step, which
        // touches `state`, `images`, the models' parameters and `ws`'s buffers. All outlive the
        // graph (declared after them, it is dropped first), keep their addresses (no step
        // after the capture allocates or gives back a buffer) and their roles.
        let mut graph: Option<GpuGraph> = None;
        // One capture at most per batch: a failed one leaves the batch to launches.
        let mut may_capture = gpu.cuda_graphs();
        let mut capture_next = false;
        // Two marks, set at the end of alternate steps.
        let marks = [gpu.new_mark()?, gpu.new_mark()?];
        for (done, i) in (0..steps).rev().enumerate() {
            for (now, all) in state.timesteps.iter_mut().zip(&timesteps) {
                let rows = now.len();
                gpu.copy(all, i * rows, now)?;
            }
            match &graph {
                Some(g) => unsafe { gpu.launch_graph(g) }?,
                None if capture_next => {
                    (may_capture, capture_next) = (false, false);
                    match gpu
                        .capture(|| self.predict_gpu(gpu, models, images, first, b, &mut state, ws))
                    {
                        Ok(g) => unsafe { gpu.launch_graph(graph.insert(g)) }?,
                        Err(e) => {
                            gpu.note_graph_failure(&e);
                            self.predict_gpu(gpu, models, images, first, b, &mut state, ws)?;
                        }
                    }
                }
                None => {
                    let allocations = ws.allocations();
                    self.predict_gpu(gpu, models, images, first, b, &mut state, ws)?;
                    // A step that took every buffer from the workspace will again: capture the
                    // next one (never a step that may allocate, which a graph cannot replay).
                    capture_next =
                        may_capture && done + 1 < steps && ws.allocations() == allocations;
                }
            }
            let params = match self.spec.sampler {
                SamplerKind::Ddim { eta } => {
                    self.diffusion
                        .ddim_params(i, eta, self.spec.clip_denoised)?
                }
                SamplerKind::Ddpm => self.diffusion.ddpm_params(i, self.spec.clip_denoised)?,
            }
            .with_noise_key(self.spec.seed, i as u32);
            let var = match self.spec.sampler {
                SamplerKind::Ddpm => state.var.as_ref(),
                SamplerKind::Ddim { .. } => None,
            };
            diffusion_step_gpu(
                gpu,
                &mut state.x,
                &state.eps,
                weights,
                terms,
                var,
                b,
                len,
                first,
                params,
            )?;
            // One step in flight: the host waits for the one before, so that progress follows
            // the GPU instead of the host queueing the whole run at once.
            gpu.mark(&marks[done % 2])?;
            if done > 0 {
                marks[(done - 1) % 2].wait()?;
                on_step();
            }
        }
        let samples = gpu.download(&state.x)?;
        on_step();
        Ok(samples)
    }

    /// Every model group's forward pass on the current state: packs each group's input, runs
    /// it, and unpacks the eps of each term (and the unconditional variance) into `state`.
    #[allow(clippy::too_many_arguments)]
    fn predict_gpu<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        models: &[GpuUNet<T>],
        images: &[Option<(GpuBuffer<f32>, usize)>],
        first: usize,
        b: usize,
        state: &mut BatchState<T>,
        ws: &mut GpuWorkspace<T>,
    ) -> Result<()> {
        let (h, w) = (self.spec.height, self.spec.width);
        let (hw, len) = (h * w, self.image_len());
        let uncond = self.terms.len() - 1;
        for (g, (m, rows)) in self.groups.iter().enumerate() {
            let model = &models[*m];
            let cfg = model.config();
            let (cin, oc) = (cfg.in_channels, cfg.out_channels());
            let n = rows.len() * b;
            let input = &mut state.inputs[g];
            for (r, &term) in rows.iter().enumerate() {
                let cond = images[term].as_ref().map(|(buf, count)| (buf, *count));
                let at = r * b * hw * cin;
                pack_input_gpu(gpu, &state.x, cond, first, b, hw, cin - 3, input, at)?;
            }
            let cond = GpuConditioning {
                timesteps: &state.timesteps[g],
                labels: state.conditions[g].labels.as_ref(),
                embedding: state.conditions[g].embedding.as_ref(),
            };
            let out = model.forward(input, [n, h, w, cin], &cond, ws)?;
            for (r, &term) in rows.iter().enumerate() {
                let v = if term == uncond {
                    state.var.as_mut()
                } else {
                    None
                };
                unpack_output_gpu(
                    gpu,
                    &out,
                    r * b * hw * oc,
                    oc,
                    &mut state.eps,
                    term * b * len,
                    v,
                    b,
                    hw,
                )?;
            }
            ws.give(out);
        }
        Ok(())
    }
}

/// A batch's device buffers, at the same addresses for all its steps.
struct BatchState<T> {
    /// x_t, `[b, len]`, updated in place by each step.
    x: GpuBuffer<f32>,
    /// Every term's eps, `[terms, b, len]` (the unconditional term last).
    eps: GpuBuffer<f32>,
    /// The unconditional model's variance channels, `[b, len]`, for a learned variance.
    var: Option<GpuBuffer<f32>>,
    /// Per model group: its packed NHWC input, its rows' timesteps for the current step, and
    /// its rows' labels and embeddings.
    inputs: Vec<GpuBuffer<T>>,
    timesteps: Vec<GpuBuffer<f32>>,
    conditions: Vec<GroupInputs>,
}

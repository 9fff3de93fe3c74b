//! The step loop, written once over [`Backend`]: the state, conditions and eps predictions stay
//! on the backend's device; each step packs the inputs of every model group, runs its batched
//! forward pass, unpacks the eps (and the unconditional variance) and applies the fused
//! combine-and-update with its Philox noise. On a GPU the host only queues work: once a step
//! has run without allocating (usually the second), the models' work of each later step is one
//! CUDA graph launch.

use std::ops::ControlFlow;

use super::{check_finite, run_in_batches, ComposedSampler, SamplerKind, INIT_NOISE_STEP};
use crate::backend::{Backend, Buffer, Cond};
use crate::device::Placement;
use crate::error::{Error, Result};
use crate::model::UNet;
use crate::rng::check_image_keys;

/// One model group's labels and embeddings for a batch, on the device.
struct GroupInputs<B: Backend> {
    labels: Option<B::Labels>,
    embedding: Option<B::Vector>,
}

/// A batch's buffers, at the same addresses for all its steps.
struct BatchState<B: Backend> {
    /// x_t, `[b, len]`, updated in place by each step.
    x: B::Vector,
    /// Every term's eps, `[terms, b, len]` (the unconditional term last).
    eps: B::Vector,
    /// The unconditional model's variance channels, `[b, len]`, for a learned variance.
    var: Option<B::Vector>,
    /// A multistep solver's history, `[3, b, len]`: the two previous x_0 and the previous
    /// step's start (zeros before the first step, whose update gives them no weight).
    history: Option<B::Vector>,
    /// Per model group: its packed NHWC input, its rows' timesteps for the current step, and
    /// its rows' labels and embeddings.
    inputs: Vec<B::Tensor>,
    timesteps: Vec<B::Vector>,
    conditions: Vec<GroupInputs<B>>,
}

/// What a run keeps on the device for all its batches: each term's image condition (with its
/// item count) and the experts' weights.
pub(super) struct RunInputs<B: Backend> {
    images: Vec<Option<(B::Vector, usize)>>,
    weights: B::Vector,
}

impl ComposedSampler<'_> {
    /// The networks of the models on backend `B`, indexed like the models.
    fn nets<B: Placement>(&self) -> Result<Vec<Option<&UNet<B>>>> {
        let nets: Vec<Option<&UNet<B>>> = self.models.iter().map(|m| m.unet::<B>()).collect();
        for (m, _) in &self.groups {
            if nets[*m].is_none() {
                return Err(Error::Input(format!(
                    "model {m} ({}) is not on the sampler's device",
                    self.models[*m].file.path().display()
                )));
            }
        }
        Ok(nets)
    }

    /// The image conditions and weights of a run, uploaded.
    pub(super) fn run_inputs<B: Backend>(&self, be: &mut B) -> Result<RunInputs<B>> {
        let images = self
            .terms
            .iter()
            .map(|(_, c)| {
                c.image
                    .as_ref()
                    .map(|img| Ok((be.upload(&img.data)?, img.count)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let weights = be.upload(if self.weights.is_empty() {
            &[0.0]
        } else {
            &self.weights
        })?;
        Ok(RunInputs { images, weights })
    }

    /// [`ComposedSampler::sample_each`] on backend `B`. A batch that does not fit in the
    /// device's memory is run again at half the size (the progress reports show the batch size
    /// used).
    pub(super) fn sample_each_on<B: Placement>(
        &self,
        be: &mut B,
        images: std::ops::Range<usize>,
        batch_size: usize,
        init_noise: Option<&[f32]>,
        on_step: &mut dyn FnMut(super::StepProgress) -> ControlFlow<()>,
        on_batch: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<usize> {
        let len = self.image_len();
        self.check_request(images.end, batch_size, init_noise)?;
        let run = self.run_inputs(be)?;
        let mut done = 0;
        let mut stopped = false;
        run_in_batches(images.len(), batch_size, |i, b| {
            if stopped {
                return Ok(());
            }
            let first = images.start + i;
            let x = match init_noise {
                Some(x) => be.upload(&x[first * len..(first + b) * len])?,
                None => {
                    let mut x = be.take_vector(b * len)?;
                    let seed = self.spec.seed;
                    be.fill_normals(&mut x, [b, len], first, seed, INIT_NOISE_STEP)?;
                    x
                }
            };
            let mut progress = super::StepProgress::new(first, b, self.num_steps());
            let mut step = || {
                let flow = on_step(progress.next());
                stopped |= flow.is_break();
                flow
            };
            let out = self
                .sample_batch_on(be, &run, first, x, &mut step)
                .inspect_err(|e| {
                    // Frees the buffers sized for the batch that did not fit before the retry.
                    if matches!(e, Error::OutOfMemory { .. }) {
                        be.release_buffers();
                    }
                })?;
            if let Some(out) = out {
                check_finite(&out, len, first)?;
                on_batch(first, &out)?;
                done = i + b;
            }
            Ok(())
        })?;
        Ok(done)
    }

    /// One batch, images `first..first + b` from `x` (x_T, `[b, 3, H, W]`), every step: launch
    /// by launch until a step allocated nothing (the first sizes the pools; best fit may need
    /// a second), then, where the backend records graphs, by replaying the models' work of the
    /// next step, recorded once. The buffers that work touches keep their addresses: the state
    /// is updated in place and each step's timesteps are copied into one buffer per group.
    /// None when `on_step` asked to stop before the last step.
    pub(super) fn sample_batch_on<B: Placement>(
        &self,
        be: &mut B,
        run: &RunInputs<B>,
        first: usize,
        x: B::Vector,
        on_step: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<Option<Vec<f32>>> {
        let nets = self.nets::<B>()?;
        let len = self.image_len();
        let b = x.len() / len;
        let hw = self.spec.height * self.spec.width;
        let terms = self.terms.len();
        check_image_keys(first, b)?;
        self.check_counts(first + b)?;
        // Every term's eps, the variance, a solver's history, the packed inputs and the state,
        // about.
        let buffers =
            terms + usize::from(self.learned_variance) + 3 * usize::from(self.solver.is_some()) + 3;
        be.check_memory(
            buffers
                .saturating_mul(b * len)
                .saturating_mul(std::mem::size_of::<f32>()),
            &format!("the sampling state of a batch of {b} image(s)"),
        )?;
        // Labels and embeddings per group row, for this batch: uploaded once, used every step.
        let mut conditions = Vec::with_capacity(self.groups.len());
        for (m, rows) in &self.groups {
            let (labels, embedding) = self.group_conditions(*m, rows, first, b);
            conditions.push(GroupInputs::<B> {
                labels: labels.map(|y| be.upload_labels(&y)).transpose()?,
                embedding: embedding.map(|e| be.upload(&e)).transpose()?,
            });
        }
        let steps = self.num_steps();
        // Per group, every step's timestep for each of its rows: step i at `i * rows`.
        let mut timesteps = Vec::with_capacity(self.groups.len());
        for (_, rows) in &self.groups {
            let per_step: Vec<f32> = (0..steps)
                .flat_map(|i| std::iter::repeat_n(self.model_timestep(i), rows.len() * b))
                .collect();
            timesteps.push(be.upload(&per_step)?);
        }
        let mut inputs = Vec::with_capacity(self.groups.len());
        let mut now = Vec::with_capacity(self.groups.len());
        for (m, rows) in &self.groups {
            let cin = self.models[*m].config.unet.in_channels;
            inputs.push(be.take(rows.len() * b * hw * cin)?);
            now.push(be.take_vector(rows.len() * b)?);
        }
        let mut state = BatchState::<B> {
            x,
            eps: be.take_vector(terms * b * len)?,
            var: if self.learned_variance {
                Some(be.take_vector(b * len)?)
            } else {
                None
            },
            history: if self.solver.is_some() {
                Some(be.upload(&vec![0.0; 3 * b * len])?)
            } else {
                None
            },
            inputs,
            timesteps: now,
            conditions,
        };
        // SAFETY of each replay below: the graph records the model work of one step, which
        // touches `state`, `run`, the models' parameters and the pools' buffers. All outlive
        // the graph (dropped before the state is given back), keep their addresses (no step
        // after the capture allocates or gives back a buffer) and their roles.
        let mut graph: Option<B::Graph> = None;
        // One capture at most per batch: a failed one leaves the batch to launches.
        let mut may_capture = be.can_capture();
        let mut capture_next = false;
        let mut reported = 0;
        let mut stop = false;
        for (done, i) in (0..steps).rev().enumerate() {
            for (now, all) in state.timesteps.iter_mut().zip(&timesteps) {
                let rows = now.len();
                be.copy(all, i * rows, now)?;
            }
            let mut predict = |be: &mut B| self.predict(be, &nets, run, first, b, &mut state);
            match &graph {
                Some(g) => unsafe { be.replay(g) }?,
                None if capture_next => {
                    (may_capture, capture_next) = (false, false);
                    match be.capture(&mut predict) {
                        Ok(g) => unsafe { be.replay(graph.insert(g)) }?,
                        Err(e) => {
                            be.note_capture_failure(&e);
                            predict(be)?;
                        }
                    }
                }
                None => {
                    let allocations = be.allocations();
                    predict(be)?;
                    // A step that took every buffer from the pools will again: capture the
                    // next one (never a step that may allocate, which a graph cannot replay).
                    capture_next =
                        may_capture && done + 1 < steps && be.allocations() == allocations;
                }
            }
            let params = self.step_params(i)?;
            let var = match self.spec.sampler {
                SamplerKind::Ddpm => state.var.as_ref(),
                SamplerKind::Ddim { .. } | SamplerKind::Solver { .. } => None,
            };
            let (x, eps, history) = (&mut state.x, &state.eps, state.history.as_mut());
            be.diffusion_step(
                x,
                eps,
                &run.weights,
                terms,
                var,
                [b, len],
                first,
                params,
                history,
            )?;
            let finished = be.step_queued(done)?;
            while reported < finished {
                stop |= on_step().is_break();
                reported += 1;
            }
            if stop {
                break;
            }
        }
        let samples = if stop {
            None
        } else {
            let samples = be.download(&state.x)?;
            // The batch is finished whatever these last reports ask.
            while reported < steps {
                let _ = on_step();
                reported += 1;
            }
            Some(samples)
        };
        drop(graph);
        be.give_vector(state.x);
        be.give_vector(state.eps);
        if let Some(v) = state.var {
            be.give_vector(v);
        }
        if let Some(h) = state.history {
            be.give_vector(h);
        }
        for (input, now) in state.inputs.into_iter().zip(state.timesteps) {
            be.give(input);
            be.give_vector(now);
        }
        Ok(samples)
    }

    /// Every model group's forward pass on the current state: packs each group's input, runs
    /// it, and unpacks the eps of each term (and the unconditional variance) into `state`.
    fn predict<B: Backend>(
        &self,
        be: &mut B,
        nets: &[Option<&UNet<B>>],
        run: &RunInputs<B>,
        first: usize,
        b: usize,
        state: &mut BatchState<B>,
    ) -> Result<()> {
        let (h, w) = (self.spec.height, self.spec.width);
        let (hw, len) = (h * w, self.image_len());
        let uncond = self.terms.len() - 1;
        for (g, (m, rows)) in self.groups.iter().enumerate() {
            let net = nets[*m].ok_or_else(|| Error::Input(format!("model {m} is not loaded")))?;
            let cfg = net.config();
            let (cin, oc) = (cfg.in_channels, cfg.out_channels());
            let n = rows.len() * b;
            let input = &mut state.inputs[g];
            for (r, &term) in rows.iter().enumerate() {
                let cond = run.images[term].as_ref().map(|(buf, count)| (buf, *count));
                let at = r * b * hw * cin;
                be.pack_input(&state.x, cond, first, [b, hw, cin - 3], input, at)?;
            }
            let cond = Cond {
                timesteps: &state.timesteps[g],
                labels: state.conditions[g].labels.as_ref(),
                embedding: state.conditions[g].embedding.as_ref(),
            };
            let out = net.forward(be, input, [n, h, w, cin], cond)?;
            for (r, &term) in rows.iter().enumerate() {
                let var = if term == uncond {
                    state.var.as_mut()
                } else {
                    None
                };
                let eps = &mut state.eps;
                be.unpack_output(&out, r * b * hw * oc, oc, eps, term * b * len, var, [b, hw])?;
            }
            be.give(out);
        }
        Ok(())
    }
}

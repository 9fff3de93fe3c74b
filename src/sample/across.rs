//! One run over several devices: a worker thread per device, each with its own sampler (its own
//! uploaded models and CUDA graphs), taking whole batches from a shared queue. Image k's noise
//! depends only on the seed and k, so the images are those of a one-device run with the same
//! batch size. Finished batches are handed on in image order.

use std::collections::BTreeMap;
use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use crate::error::{Error, Result};
use crate::sample::{ComposedSampler, StepProgress};

/// The batches not yet taken.
struct Queue {
    next: usize,
    /// Batches a failed device left unfinished, for the others to make first.
    retry: Vec<usize>,
    /// After a failure or a stop only retried batches are handed out.
    closed: bool,
}

/// What a worker tells the thread that hands batches on.
enum Report {
    Batch(usize, Vec<f32>),
    /// Worker `worker`'s device failed at the batch from image `first`.
    Failed {
        worker: usize,
        first: usize,
        error: Error,
    },
}

/// [`ComposedSampler::sample_each`] of `images` with one worker per sampler (each on its own
/// device), batches of `batch_size` handed out in order: `on_step(worker, progress)` from the
/// workers, `on_batch(first, x_0)` on the calling thread, in image order. When a device fails,
/// no new batch is started; the others finish theirs and the failed one, so that every image
/// finished before the failure reaches `on_batch`; then the device's error is returned, naming
/// it. When `on_step` breaks, every worker stops after its step. The result is the number of
/// images finished from `images.start`, in order.
pub fn sample_each_across(
    samplers: &[ComposedSampler],
    images: Range<usize>,
    batch_size: usize,
    init_noise: Option<&[f32]>,
    on_step: &(dyn Fn(usize, StepProgress) -> ControlFlow<()> + Sync),
    on_batch: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<usize> {
    if samplers.is_empty() || batch_size == 0 {
        return Err(Error::Input(
            "sampling needs at least one device and a positive batch size".into(),
        ));
    }
    let batches = images.len().div_ceil(batch_size);
    let batch = |b: usize| {
        let first = images.start + b * batch_size;
        first..(first + batch_size).min(images.end)
    };
    let queue = Mutex::new(Queue {
        next: 0,
        retry: Vec::new(),
        closed: false,
    });
    let take = || {
        let mut q = queue.lock().expect("the batch queue");
        if let Some(b) = q.retry.pop() {
            return Some(b);
        }
        (!q.closed && q.next < batches).then(|| {
            q.next += 1;
            q.next - 1
        })
    };
    let image_len = samplers[0].image_len();
    let stop = AtomicBool::new(false);
    let (reports, received) = mpsc::channel::<Report>();
    let mut next = images.start;
    let mut failure: Option<Error> = None;
    std::thread::scope(|scope| {
        for (w, sampler) in samplers.iter().enumerate() {
            let reports = reports.clone();
            let (take, stop, queue) = (&take, &stop, &queue);
            scope.spawn(move || {
                let mut step = |p: StepProgress| {
                    if stop.load(Ordering::Relaxed) {
                        return ControlFlow::Break(());
                    }
                    let flow = on_step(w, p);
                    if flow.is_break() {
                        stop.store(true, Ordering::Relaxed);
                        queue.lock().expect("the batch queue").closed = true;
                    }
                    flow
                };
                while let Some(b) = take() {
                    let range = batch(b);
                    let mut send = |first: usize, x0: &[f32]| {
                        reports
                            .send(Report::Batch(first, x0.to_vec()))
                            .map_err(|_| Error::Input("the run has ended".into()))
                    };
                    // The initial noise of images 0..range.end, as sample_each takes it.
                    let noise = init_noise.map(|n| &n[..(range.end * image_len).min(n.len())]);
                    match sampler.sample_each(
                        range.clone(),
                        batch_size,
                        noise,
                        &mut step,
                        &mut send,
                    ) {
                        Ok(made) if made == range.len() => {}
                        // Stopped by on_step: the others stop too.
                        Ok(_) => break,
                        Err(e) => {
                            let mut q = queue.lock().expect("the batch queue");
                            q.closed = true;
                            // What this device finished of the batch was handed on; the rest
                            // is retried whole (a batch is made the same on any device).
                            q.retry.push(b);
                            drop(q);
                            let _ = reports.send(Report::Failed {
                                worker: w,
                                first: range.start,
                                error: e,
                            });
                            break;
                        }
                    }
                }
            });
        }
        drop(reports);
        // Batches arrive in any order; they are handed on in image order.
        let mut waiting: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        let mut handing_on = true;
        for report in received {
            match report {
                Report::Batch(first, mut x0) => {
                    // A retried batch repeats the images its failed device handed on.
                    let skip = next.saturating_sub(first).min(x0.len() / image_len);
                    x0.drain(..skip * image_len);
                    let at = first + skip;
                    if !x0.is_empty() && waiting.get(&at).is_none_or(|w| w.len() < x0.len()) {
                        waiting.insert(at, x0);
                    }
                }
                Report::Failed {
                    worker,
                    first,
                    error,
                } => {
                    if failure.is_none() {
                        failure = Some(device_failure(error, samplers, worker, first));
                    }
                }
            }
            while handing_on {
                let Some(x0) = waiting.remove(&next) else {
                    break;
                };
                if let Err(e) = on_batch(next, &x0) {
                    failure = Some(e);
                    handing_on = false;
                    stop.store(true, Ordering::Relaxed);
                    queue.lock().expect("the batch queue").closed = true;
                    break;
                }
                next += x0.len() / image_len;
            }
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(next - images.start),
    }
}

/// A device's error with the device named when there are several; out of memory keeps its
/// variant (the caller words it).
fn device_failure(e: Error, samplers: &[ComposedSampler], worker: usize, first: usize) -> Error {
    if samplers.len() == 1 || matches!(e, Error::OutOfMemory { .. }) {
        return e;
    }
    let device = match samplers[worker].device().gpu() {
        Some(gpu) => format!("GPU {} ({})", gpu.info().ordinal, gpu.info().name),
        None => format!("device {worker}"),
    };
    Error::Cuda(format!(
        "{device} failed at the batch from image {first} (the other devices finished what had \
         been started before it, and its batch): {}",
        e.to_string().trim_start_matches("CUDA: ")
    ))
}

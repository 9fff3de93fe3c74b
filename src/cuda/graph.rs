//! CUDA graphs: a stretch of launches and device copies recorded once by stream capture and
//! replayed with one driver call. The composed sampler replays each step's model passes this
//! way, hundreds of launches that would otherwise each cost the host a few microseconds.

use std::sync::atomic::Ordering;

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph};

use super::{cuda_err, Gpu, GpuBuffer, GpuFloat};
use crate::error::{Error, Result};

/// Work recorded by [`Gpu::capture`], launched by [`Gpu::launch_graph`]. It holds the device
/// addresses it was recorded with, not the buffers: see [`Gpu::launch_graph`]'s safety
/// contract. (Dropped while a launch runs, the driver frees it when the launch completes.)
pub struct GpuGraph(CudaGraph);

/// A point in the stream's work, set by [`Gpu::mark`] (and moved by setting it again).
pub struct StreamMark(CudaEvent);

impl StreamMark {
    /// Blocks the host until the work enqueued before the mark has run.
    pub fn wait(&self) -> Result<()> {
        self.0
            .synchronize()
            .map_err(cuda_err("waiting for the GPU"))
    }
}

impl Gpu {
    /// A mark for [`Gpu::mark`], made once and set as often as needed.
    pub fn new_mark(&self) -> Result<StreamMark> {
        // Blocking: a host waiting for a step sleeps instead of spinning a core.
        let flags = CUevent_flags::CU_EVENT_BLOCKING_SYNC;
        self.ctx
            .new_event(Some(flags))
            .map(StreamMark)
            .map_err(cuda_err("creating an event"))
    }

    /// Sets `mark` at the work enqueued so far, so that the host can wait for it and no longer.
    pub fn mark(&self, mark: &StreamMark) -> Result<()> {
        self.refuse_while_capturing("marking the stream")?;
        mark.0
            .record(&self.stream)
            .map_err(cuda_err("recording an event"))
    }

    /// Records the launches and device-to-device copies that `enqueue` puts on the stream,
    /// without running them. While it records, allocations, uploads, downloads and
    /// synchronisation are refused (a graph cannot replay them), and so are launches from other
    /// threads and capture while profiling. On an error, or a panic in `enqueue` (passed on),
    /// nothing was run and the stream is usable again.
    pub fn capture(&self, enqueue: impl FnOnce() -> Result<()>) -> Result<GpuGraph> {
        if self.profile_marks()?.is_some() {
            return Err(Error::Cuda(
                "cannot capture a CUDA graph while profiling".into(),
            ));
        }
        // Thread-local: only this thread's calls are checked against the capture.
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream
            .begin_capture(mode)
            .map_err(cuda_err("beginning a CUDA graph capture"))?;
        if let Ok(mut thread) = self.capture_thread.lock() {
            *thread = Some(std::thread::current().id());
        }
        self.capturing.store(true, Ordering::Relaxed);
        // A panic must not leave the stream capturing: end the capture, then pass it on.
        let recorded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(enqueue));
        self.capturing.store(false, Ordering::Relaxed);
        // A buffer that a failed `enqueue` dropped could not be freed during the capture.
        // cudarc keeps that error in the context, where it would stop the call that ends the
        // capture and leave the stream capturing: take it out first.
        let dropped = self.ctx.check_err();
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let recorded = recorded.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // The work's own error says more than the invalidated capture it causes.
        recorded?;
        dropped.map_err(cuda_err("a CUDA call during a graph capture"))?;
        match ended.map_err(cuda_err("ending a CUDA graph capture"))? {
            Some(graph) => Ok(GpuGraph(graph)),
            None => Err(Error::Cuda(
                "the CUDA graph capture recorded nothing".into(),
            )),
        }
    }

    /// Enqueues the work `graph` recorded.
    ///
    /// # Safety
    /// Every buffer the recorded work touched must still be alive, at the address it had, and
    /// hold what the work expects: the graph replays raw device addresses, so a buffer dropped
    /// since the capture (its memory perhaps reused by another) would be read and written.
    pub unsafe fn launch_graph(&self, graph: &GpuGraph) -> Result<()> {
        graph
            .0
            .launch()
            .map_err(cuda_err("launching a CUDA graph"))?;
        self.graph_launches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Graphs launched so far by this device handle.
    pub fn graph_launches(&self) -> usize {
        self.graph_launches.load(Ordering::Relaxed)
    }

    /// An error when another thread than the capturing one enqueues `what` during a capture: it
    /// would be recorded into that thread's graph instead of running.
    pub(crate) fn refuse_other_threads_while_capturing(&self, what: &str) -> Result<()> {
        if !self.capturing.load(Ordering::Relaxed) {
            return Ok(());
        }
        let capturing = self.capture_thread.lock().ok().and_then(|t| *t);
        if capturing != Some(std::thread::current().id()) {
            return Err(Error::Cuda(format!(
                "{what} from another thread while a CUDA graph is being captured"
            )));
        }
        Ok(())
    }

    /// An error when a capture is recording: `what` cannot be part of a graph.
    pub(crate) fn refuse_while_capturing(&self, what: &str) -> Result<()> {
        if self.capturing.load(Ordering::Relaxed) {
            return Err(Error::Cuda(format!("{what} while capturing a CUDA graph")));
        }
        Ok(())
    }

    /// Whether [`crate::sample::ComposedSampler::sample_gpu`] replays its steps as CUDA graphs
    /// (on unless [`Gpu::set_cuda_graphs`] turned it off).
    pub fn cuda_graphs(&self) -> bool {
        self.cuda_graphs.load(Ordering::Relaxed)
    }

    /// Turns graph replay on or off (off: every launch is enqueued by the host, for comparison).
    pub fn set_cuda_graphs(&self, on: bool) {
        self.cuda_graphs.store(on, Ordering::Relaxed);
    }

    /// Why the last capture of a graph failed since the previous call, if one did; the work then
    /// ran launch by launch, with the same results.
    pub fn take_graph_failure(&self) -> Option<String> {
        self.graph_failure.lock().ok()?.take()
    }

    pub(crate) fn note_graph_failure(&self, e: &Error) {
        if let Ok(mut failure) = self.graph_failure.lock() {
            *failure = Some(e.to_string());
        }
    }

    /// Copies elements `offset .. offset + dst.len()` of `src` into `dst`, on the stream.
    pub fn copy<T: GpuFloat>(
        &self,
        src: &GpuBuffer<T>,
        offset: usize,
        dst: &mut GpuBuffer<T>,
    ) -> Result<()> {
        let n = dst.len();
        if offset.checked_add(n).is_none_or(|end| end > src.len()) {
            return Err(Error::Cuda(format!(
                "copying {n} elements from element {offset} of a buffer of {}",
                src.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.refuse_other_threads_while_capturing("copying")?;
        let from = src.slice().slice(offset..offset + n);
        let mut to = dst.slice_mut().slice_mut(..n);
        self.stream
            .memcpy_dtod(&from, &mut to)
            .map_err(cuda_err("device copy"))
    }
}

//! The CUDA runtime: device discovery, kernel modules and launches through cudarc with dynamic
//! loading, so the same binary runs (on the CPU) where no CUDA driver exists.
//!
//! Kernels (`kernels/*.cu`) are compiled by `build.rs` with NVRTC to CUBIN for sm_80, sm_86,
//! sm_89 and sm_90 plus PTX for compute_90, and embedded. A device whose architecture has no
//! image gets the embedded PTX (sm_90 and newer) or, failing that, the embedded sources compiled
//! at first use with the NVRTC found at run time, cached on disk.

pub mod buffer;
mod graph;
/// Compiled into build.rs, which reads every CUBIN's report; here for its tests.
#[cfg(test)]
mod ptxas_report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

pub use buffer::GpuBuffer;
pub use graph::{GpuGraph, StreamMark};

mod embedded {
    use super::KernelResources;
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The kernels' argument structs and constants (tile sizes, threads, stages), mirrored by
/// build.rs from their one declaration in `kernels/` (see `MCDM_ARGS` in common.cuh).
pub mod interface {
    include!(concat!(env!("OUT_DIR"), "/kernel_interface.rs"));
}

/// A kernel's argument struct ([`interface`]): the kernel takes its fields, in order, as its
/// parameters (`kernel(MCDM_PARAMS(Name))` in `kernels/`).
///
/// # Safety
/// `OFFSETS` are the byte offsets of the fields, in declaration order, each field a value of
/// the matching kernel parameter's type and size (build.rs generates the impls and asserts the
/// layout on both sides).
pub unsafe trait KernelArgs: bytemuck::Pod {
    const OFFSETS: &'static [usize];
}

/// Kernel sources and images embedded at build time, and ptxas's report on each CUBIN kernel.
pub use embedded::{
    KERNEL_HEADERS, KERNEL_IMAGES, KERNEL_OPTIONS, KERNEL_RESOURCES, KERNEL_SOURCES, NVRTC_VERSION,
};

/// What ptxas reported for one kernel of one embedded CUBIN: the limits on how many of its
/// blocks share an SM, and whether it spills registers to local memory (slow).
#[derive(Debug, Clone, Copy)]
pub struct KernelResources {
    /// The kernel file stem: `kernels/<file>.cu`.
    pub file: &'static str,
    /// `sm_80` .. `sm_90`
    pub arch: &'static str,
    pub kernel: &'static str,
    /// Registers per thread.
    pub registers: u32,
    /// Static `__shared__` bytes per block (dynamic shared memory is set at launch).
    pub static_shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// Storage types of GPU activations and weights.
pub trait GpuFloat: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    /// Kernel name suffix (`_f32`, `_f16`, `_bf16`).
    const SUFFIX: &'static str;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl GpuFloat for f32 {
    const SUFFIX: &'static str = "_f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl GpuFloat for half::f16 {
    const SUFFIX: &'static str = "_f16";
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl GpuFloat for half::bf16 {
    const SUFFIX: &'static str = "_bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// The oldest GPUs the kernels run on: `mma.sync.m16n8k16` with bf16 and `cp.async` need sm_80.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Why CUDA cannot be used here, or `None` when a driver and a device that can run the kernels
/// (device 0, the one mcdm uses) are present.
pub fn unavailable_reason() -> Option<String> {
    no_driver_reason().or_else(|| too_old(0))
}

/// Why the driver cannot be used, or `None` when it is present and reports a device.
fn no_driver_reason() -> Option<String> {
    // cudarc panics on first use when the library is missing: check first.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver library (libcuda.so) was found".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the CUDA driver reports no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the CUDA driver failed to initialise: {e:?}")),
    }
}

/// Why device `ordinal` cannot run the kernels, if its compute capability is below
/// [`MIN_COMPUTE_CAPABILITY`]. Asks the driver without creating a context.
fn too_old(ordinal: i32) -> Option<String> {
    use cudarc::driver::result::device;
    use cudarc::driver::sys::CUdevice_attribute::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
    };
    let dev = device::get(ordinal).ok()?;
    // SAFETY: `dev` is a device handle the initialised driver returned.
    let cc = unsafe {
        (
            device::get_attribute(dev, MAJOR),
            device::get_attribute(dev, MINOR),
        )
    };
    let (Ok(major), Ok(minor)) = cc else {
        return None;
    };
    let (min_major, min_minor) = MIN_COMPUTE_CAPABILITY;
    ((major, minor) < MIN_COMPUTE_CAPABILITY).then(|| {
        format!(
            "GPU {ordinal} ({}) has compute capability {major}.{minor}; mcdm's kernels need \
             {min_major}.{min_minor} or newer (A100, RTX 30 series and later)",
            device::get_name(dev).unwrap_or_else(|_| "unnamed".into())
        )
    })
}

/// One GPU as `mcdm info` shows it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors (SMs).
    pub multiprocessors: usize,
    /// L2 cache size in bytes.
    pub l2_cache_bytes: usize,
}

impl DeviceInfo {
    fn query(ctx: &CudaContext, ordinal: usize) -> Result<Self> {
        use cudarc::driver::sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        };
        Ok(DeviceInfo {
            ordinal,
            name: ctx.name().map_err(cuda_err("device name"))?,
            total_memory: ctx.total_mem().map_err(cuda_err("device memory"))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(cuda_err("compute capability"))?,
            multiprocessors: ctx
                .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(cuda_err("multiprocessor count"))? as usize,
            l2_cache_bytes: ctx
                .attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
                .map_err(cuda_err("L2 cache size"))? as usize,
        })
    }
}

/// Every device the driver reports, also those too old for the kernels.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    if let Some(reason) = no_driver_reason() {
        return Err(Error::Cuda(reason));
    }
    let count = CudaContext::device_count().map_err(cuda_err("counting devices"))?;
    (0..count as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating a context"))?;
            DeviceInfo::query(&ctx, ordinal)
        })
        .collect()
}

/// The driver version as (major, minor).
pub fn driver_version() -> Option<(i32, i32)> {
    if no_driver_reason().is_some() {
        return None;
    }
    let mut v = 0;
    // SAFETY: the library is present (checked above); the call only writes `v`.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    Some((v / 1000, (v % 1000) / 10))
}

/// A device with its stream and the kernel modules loaded; launches go through it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// Kernels loaded so far, with the dynamic shared memory limit set on each (0: the default).
    functions: Mutex<HashMap<String, (CudaFunction, u32)>>,
    info: DeviceInfo,
    /// While profiling ([`Gpu::profile_start`]): each launch's kernel and its start and end events.
    profile: Mutex<Option<Vec<LaunchMarks>>>,
    /// While [`Gpu::capture`] records, and the thread it records for.
    capturing: AtomicBool,
    capture_thread: Mutex<Option<std::thread::ThreadId>>,
    /// See [`Gpu::cuda_graphs`].
    cuda_graphs: AtomicBool,
    /// See [`Gpu::take_graph_failure`].
    graph_failure: Mutex<Option<String>>,
    /// See [`Gpu::graph_launches`].
    graph_launches: AtomicUsize,
    /// See [`Gpu::kernel_launches`].
    kernel_launches: AtomicUsize,
}

/// A profiled launch: the kernel's file under `kernels/` (without `.cu`) and name, and the
/// events recorded before and after it.
type LaunchMarks = ((String, String), CudaEvent, CudaEvent);

/// The GPU time of one kernel over a profiled stretch of work ([`Gpu::profile_finish`]).
#[derive(Clone, Debug)]
pub struct KernelTime {
    /// `kernels/<file>.cu`
    pub file: String,
    pub name: String,
    pub launches: usize,
    /// Summed over its launches, from events recorded around each.
    pub ms: f64,
}

impl Gpu {
    /// Opens device `ordinal`: one context, one stream, every kernel module loaded once.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if let Some(reason) = unavailable_reason() {
            return Err(Error::Cuda(format!("{reason}; use --device cpu")));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating a context"))?;
        // Event tracking makes every launch wait on per-buffer events; our single stream
        // orders everything already.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let stream = ctx.new_stream().map_err(cuda_err("creating a stream"))?;
        let info = DeviceInfo::query(&ctx, ordinal)?;
        let mut modules = HashMap::new();
        let hint = older_driver_hint(driver_version(), NVRTC_VERSION);
        for &(file, source) in KERNEL_SOURCES {
            let ptx = module_image(file, source, info.compute_capability)?;
            let module = ctx
                .load_module(ptx)
                .map_err(|e| Error::Cuda(format!("loading kernels/{file}.cu: {e:?}{hint}")))?;
            modules.insert(file, module);
        }
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            info,
            profile: Mutex::new(None),
            capturing: AtomicBool::new(false),
            capture_thread: Mutex::new(None),
            cuda_graphs: AtomicBool::new(true),
            graph_failure: Mutex::new(None),
            graph_launches: AtomicUsize::new(0),
            kernel_launches: AtomicUsize::new(0),
        }))
    }

    /// Starts timing every launch with a pair of events (a little host work per launch; off
    /// by default). [`Gpu::profile_finish`] collects the times.
    pub fn profile_start(&self) -> Result<()> {
        *self.profile_marks()? = Some(Vec::new());
        Ok(())
    }

    /// Stops profiling, waits for the stream and returns each kernel's time since
    /// [`Gpu::profile_start`], the longest first.
    pub fn profile_finish(&self) -> Result<Vec<KernelTime>> {
        let marks = self.profile_marks()?.take().unwrap_or_default();
        self.synchronize()?;
        let mut times: Vec<KernelTime> = Vec::new();
        for ((file, name), start, end) in marks {
            let ms = start.elapsed_ms(&end).map_err(cuda_err("kernel timing"))? as f64;
            match times.iter_mut().find(|t| t.file == file && t.name == name) {
                Some(t) => {
                    t.launches += 1;
                    t.ms += ms;
                }
                None => times.push(KernelTime {
                    file,
                    name,
                    launches: 1,
                    ms,
                }),
            }
        }
        times.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(times)
    }

    fn profile_marks(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<LaunchMarks>>>> {
        self.profile
            .lock()
            .map_err(|_| Error::Cuda("profile poisoned".into()))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(cuda_err("memory info"))
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_while_capturing("synchronising")?;
        self.stream.synchronize().map_err(cuda_err("synchronising"))
    }

    /// The kernel `name` of `kernels/<file>.cu`, loaded once and cached, with its dynamic
    /// shared memory limit raised to `shared_bytes` where that passes the 48 KiB default (the
    /// limit belongs to this handle's module, so each handle raises its own).
    fn function(&self, file: &str, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
        const DEFAULT_LIMIT: u32 = 48 * 1024;
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| Error::Cuda("function cache poisoned".into()))?;
        let (f, limit) = match cache.get_mut(name) {
            Some(entry) => entry,
            None => {
                // Loading a function needs the context current on this thread (a launch binds
                // it, a load does not): the first launch of a kernel may come from any thread.
                self.ctx
                    .bind_to_thread()
                    .map_err(cuda_err("binding the CUDA context"))?;
                let module = self
                    .modules
                    .get(file)
                    .ok_or_else(|| Error::Cuda(format!("no kernel module `{file}`")))?;
                let f = module
                    .load_function(name)
                    .map_err(cuda_err(&format!("kernel `{name}`")))?;
                cache.entry(name.to_string()).or_insert((f, 0))
            }
        };
        if shared_bytes > DEFAULT_LIMIT && shared_bytes > *limit {
            let attr = cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(attr, shared_bytes as i32)
                .map_err(cuda_err(&format!("`{name}` shared memory limit")))?;
            *limit = shared_bytes;
        }
        Ok(f.clone())
    }

    /// Launches `file::name` with its argument struct `args` (`kernels/<file>.cu` declares
    /// it; [`interface`] mirrors it): each field is one parameter.
    pub(crate) fn launch<A: KernelArgs>(
        &self,
        file: &str,
        name: &str,
        cfg: LaunchConfig,
        args: &A,
    ) -> Result<()> {
        // No blocks (an empty tensor): nothing to do, and the driver refuses such a grid.
        let (x, y, z) = cfg.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            return Ok(());
        }
        self.refuse_other_threads_while_capturing("launching a kernel")?;
        let f = self.function(file, name, cfg.shared_mem_bytes)?;
        let mut builder = self.stream.launch_builder(&f);
        // The driver copies each parameter's size from where its first byte is.
        let bytes = bytemuck::bytes_of(args);
        for &offset in A::OFFSETS {
            builder.arg(&bytes[offset]);
        }
        let mut profile = self.profile_marks()?;
        let record = || -> Result<CudaEvent> {
            let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
            self.stream
                .record_event(Some(flags))
                .map_err(cuda_err("recording a profile event"))
        };
        let start = profile.as_ref().map(|_| record()).transpose()?;
        // SAFETY: every launch wrapper checks buffer lengths against the sizes it passes, and
        // the argument list matches the kernel's signature in kernels/<file>.cu.
        unsafe { builder.launch(cfg) }.map_err(cuda_err(&format!("launching `{name}`")))?;
        self.kernel_launches.fetch_add(1, Ordering::Relaxed);
        if let (Some(marks), Some(start)) = (profile.as_mut(), start) {
            marks.push(((file.to_string(), name.to_string()), start, record()?));
        }
        Ok(())
    }

    /// Kernel launches the host has enqueued (or recorded into a graph) so far through this
    /// handle: with [`Gpu::graph_launches`], what a stretch of work cost the host.
    pub fn kernel_launches(&self) -> usize {
        self.kernel_launches.load(Ordering::Relaxed)
    }

    /// A zeroed buffer of `len` elements.
    pub fn zeros<T: GpuFloat>(&self, len: usize) -> Result<GpuBuffer<T>> {
        self.refuse_while_capturing("allocating")?;
        let bytes = self.bytes_of::<T>(len)?;
        let slice = self
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| out_of_memory(self, bytes, e))?;
        Ok(GpuBuffer::new(slice, len))
    }

    /// The bytes of `len` values of `T`, or an out-of-memory error where that passes what any
    /// allocation can be (cudarc's own product would wrap).
    fn bytes_of<T>(&self, len: usize) -> Result<usize> {
        len.checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| Error::OutOfMemory {
                device: self.info.name.clone(),
                bytes: usize::MAX,
                free: self.memory().map(|(f, _)| f).unwrap_or(0),
            })
    }

    /// Uploads host values converted to `T`.
    pub fn upload<T: GpuFloat>(&self, values: &[f32]) -> Result<GpuBuffer<T>> {
        if values.is_empty() {
            // The driver allocates no 0-byte buffer: `zeros` holds one element.
            return self.zeros(0);
        }
        self.refuse_while_capturing("uploading")?;
        let host: Vec<T> = values.iter().map(|&v| T::from_f32(v)).collect();
        let slice = self
            .stream
            .clone_htod(&host)
            .map_err(|e| out_of_memory(self, host.len() * std::mem::size_of::<T>(), e))?;
        Ok(GpuBuffer::new(slice, values.len()))
    }

    /// Uploads raw values of any device type (labels, tables).
    pub fn upload_raw<T: DeviceRepr + ValidAsZeroBits + Copy>(
        &self,
        values: &[T],
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        self.refuse_while_capturing("uploading")?;
        if values.is_empty() {
            return Err(Error::Input(
                "uploading no values: a device buffer holds at least one".into(),
            ));
        }
        self.stream
            .clone_htod(values)
            .map_err(|e| out_of_memory(self, std::mem::size_of_val(values), e))
    }

    /// Copies a buffer back as f32 (waits for the stream).
    pub fn download<T: GpuFloat>(&self, buf: &GpuBuffer<T>) -> Result<Vec<f32>> {
        self.refuse_while_capturing("downloading")?;
        let host = self
            .stream
            .clone_dtoh(buf.slice())
            .map_err(cuda_err("download"))?;
        Ok(host[..buf.len()].iter().map(|v| v.to_f32()).collect())
    }
}

/// What to add to a failed module load when the driver is older than the NVRTC that built the
/// embedded images: a CUDA 12 driver cannot load what CUDA 13's NVRTC made.
fn older_driver_hint(driver: Option<(i32, i32)>, nvrtc: Option<(i32, i32)>) -> String {
    match (driver, nvrtc) {
        (Some(d), Some(n)) if d < n => format!(
            " (this driver supports CUDA {}.{}, older than the NVRTC {}.{} that compiled mcdm's \
             kernels: update the NVIDIA driver, or compile the kernels with the NVRTC of a CUDA \
             {}.{} or older: set MCDM_KERNEL_SOURCE=1 with that NVRTC on the library path, or \
             build mcdm with it through MCDM_NVRTC_LIB and MCDM_CUDA_INCLUDE)",
            d.0, d.1, n.0, n.1, d.0, d.1
        ),
        _ => String::new(),
    }
}

/// Raises the release threshold of the device's default memory pool (0 by default), so that
/// memory freed between steps stays in the pool for the next allocation instead of going back
/// to the system at every synchronisation.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::{result, sys};
    let mut threshold = u64::MAX;
    // SAFETY: the device handle is the context's; the attribute takes a u64, read during the call.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())
            .map_err(cuda_err("default memory pool"))?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(cuda_err("memory pool release threshold"))
    }
}

/// [`Error::OutOfMemory`] when the device is out of memory, else the driver's error.
fn out_of_memory(gpu: &Gpu, bytes: usize, e: cudarc::driver::DriverError) -> Error {
    if e.0 != cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Error::Cuda(format!("allocating {bytes} bytes: {e:?}"));
    }
    Error::OutOfMemory {
        device: gpu.info.name.clone(),
        bytes,
        free: gpu.memory().map(|(f, _)| f).unwrap_or(0),
    }
}

/// 1-D launch over `n` elements, one a thread, `threads` threads a block.
pub(crate) fn grid_1d(n: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(threads).max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The module image for a device of compute capability `cc`: an embedded CUBIN of its major
/// version with the highest minor not above its own (a CUBIN runs on those GPUs: sm_86 on an
/// sm_87), else the embedded compute_90 PTX on sm_90 and newer (the driver compiles it), else
/// the source compiled now by NVRTC (cached on disk). `MCDM_KERNEL_SOURCE=1` skips the embedded
/// images and compiles the sources with the NVRTC found at run time (one that matches an older
/// driver, say).
fn module_image(file: &str, source: &str, cc: (i32, i32)) -> Result<Ptx> {
    if std::env::var_os("MCDM_KERNEL_SOURCE").is_some_and(|v| v == "1") {
        return compile_at_runtime(file, source, cc);
    }
    let images = || KERNEL_IMAGES.iter().filter(move |(f, _, _)| *f == file);
    if let Some(arch) = compatible_cubin(images().map(|(_, arch, _)| *arch), cc) {
        let (_, _, cubin) = images().find(|(_, a, _)| *a == arch).expect("listed above");
        return Ok(Ptx::from_binary(cubin.to_vec()));
    }
    if cc.0 >= 9 {
        if let Some((_, _, ptx)) = images().find(|(_, a, _)| *a == "compute_90") {
            return Ok(Ptx::from_src(
                String::from_utf8_lossy(ptx)
                    .trim_end_matches('\0')
                    .to_string(),
            ));
        }
    }
    compile_at_runtime(file, source, cc)
}

/// The embedded CUBIN architecture a GPU of compute capability `cc` runs (`sm_86` for 8.7),
/// if any (else the PTX or a run-time compilation serves it).
pub fn cubin_arch_for(cc: (i32, i32)) -> Option<&'static str> {
    compatible_cubin(KERNEL_IMAGES.iter().map(|(_, arch, _)| *arch), cc)
}

/// Of the architectures `archs` (`sm_86`, `compute_90`, ...), the CUBIN that runs on a GPU of
/// compute capability `cc`: same major version, the highest minor up to the GPU's.
fn compatible_cubin<'a>(archs: impl Iterator<Item = &'a str>, cc: (i32, i32)) -> Option<&'a str> {
    let capability = |arch: &str| -> Option<(i32, i32)> {
        let digits = arch.strip_prefix("sm_")?;
        let (major, minor) = digits.split_at(digits.len().checked_sub(1)?);
        Some((major.parse().ok()?, minor.parse().ok()?))
    };
    archs
        .filter_map(|a| Some((capability(a)?, a)))
        .filter(|&((major, minor), _)| major == cc.0 && minor <= cc.1)
        .max_by_key(|&(capability, _)| capability)
        .map(|(_, a)| a)
}

fn compile_at_runtime(file: &str, source: &str, cc: (i32, i32)) -> Result<Ptx> {
    let arch = format!("compute_{}{}", cc.0, cc.1);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(
        &(source, &arch, KERNEL_HEADERS, KERNEL_OPTIONS),
        &mut hasher,
    );
    let key = std::hash::Hasher::finish(&hasher);
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("mcdm").join(format!("{file}-{arch}-{key:016x}.ptx")));
    let cached = |p: &PathBuf| {
        crate::files::read_string_limited(p, crate::files::TEXT_LIMIT, "kernel cache").ok()
    };
    if let Some(text) = cache.as_ref().and_then(cached) {
        return Ok(Ptx::from_src(text));
    }
    let how = "build mcdm with NVRTC present (scripts/install-nvrtc.sh, then cargo build --release), \
               or install NVRTC 13 (pip install nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96) \
               and set MCDM_CUDA_INCLUDE to its include directory";
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Cuda(format!(
            "this binary has no kernel image for {arch} and no NVRTC library was found to compile one: {how}"
        )));
    }
    let include = std::env::var("MCDM_CUDA_INCLUDE")
        .ok()
        .into_iter()
        .chain(["/usr/local/cuda/include".to_string()])
        .collect();
    // The headers are spliced in, so only the CUDA toolkit's own headers need a path.
    let full_source = KERNEL_HEADERS
        .iter()
        .fold(source.to_string(), |src, (name, text)| {
            src.replace(&format!("#include \"{name}\""), text)
        });
    let mut options: Vec<String> = KERNEL_OPTIONS
        .iter()
        .find(|(f, _)| *f == file)
        .map(|(_, o)| o.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths: include,
        options,
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(full_source, opts).map_err(|e| {
        Error::Cuda(format!(
            "compiling kernels/{file}.cu for {arch}: {e:?} ({how})"
        ))
    })?;
    if let Some(path) = cache {
        // Best effort (a cache); whole or not at all, since another mcdm may be reading it.
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(&path));
        let _ = crate::files::write_atomic(&path, ptx.to_src().as_bytes());
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::{compatible_cubin, older_driver_hint, KERNEL_IMAGES, KERNEL_RESOURCES};

    #[test]
    fn a_cubin_serves_its_major_version_from_its_minor_up() {
        let archs = ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"];
        let pick = |cc| compatible_cubin(archs.iter().copied(), cc);
        assert_eq!(pick((8, 0)), Some("sm_80"));
        assert_eq!(pick((8, 6)), Some("sm_86"));
        assert_eq!(pick((8, 7)), Some("sm_86"));
        assert_eq!(pick((8, 9)), Some("sm_89"));
        assert_eq!(pick((9, 0)), Some("sm_90"));
        assert_eq!(pick((10, 0)), None);
        assert_eq!(pick((12, 0)), None);
        assert_eq!(compatible_cubin(["sm_86"].into_iter(), (8, 0)), None);
    }

    #[test]
    fn a_failed_load_names_a_driver_older_than_nvrtc() {
        let hint = older_driver_hint(Some((12, 8)), Some((13, 0)));
        assert!(
            hint.contains("CUDA 12.8, older than the NVRTC 13.0"),
            "{hint}"
        );
        assert_eq!(older_driver_hint(Some((13, 0)), Some((13, 0))), "");
        assert_eq!(older_driver_hint(Some((13, 1)), Some((13, 0))), "");
        assert_eq!(older_driver_hint(None, Some((13, 0))), "");
    }

    /// A kernel that spills keeps part of its registers in local memory (DRAM behind L1): a
    /// slowdown no test on the CPU would see, so ptxas's report on every CUBIN is checked here.
    #[test]
    fn no_kernel_spills_registers() {
        if KERNEL_RESOURCES.is_empty() {
            crate::skip_check(
                "register spills",
                "no ptxas report (built without NVRTC, or its NVRTC has no -Xptxas)",
            );
            return;
        }
        for &(file, arch, _) in KERNEL_IMAGES
            .iter()
            .filter(|(_, a, _)| a.starts_with("sm_"))
        {
            let kernels: Vec<_> = KERNEL_RESOURCES
                .iter()
                .filter(|r| r.file == file && r.arch == arch)
                .collect();
            assert!(!kernels.is_empty(), "no ptxas report for {file}.cu {arch}");
            for r in kernels {
                assert!(r.registers > 0, "ptxas report not understood: {r:?}");
            }
        }
        let spilling: Vec<String> = KERNEL_RESOURCES
            .iter()
            .filter(|r| r.spill_store_bytes + r.spill_load_bytes > 0)
            .map(|r| {
                format!(
                    "{} {} ({} registers): {} bytes spill stores, {} bytes spill loads",
                    r.kernel, r.arch, r.registers, r.spill_store_bytes, r.spill_load_bytes
                )
            })
            .collect();
        assert!(
            spilling.is_empty(),
            "kernels spill registers:\n{}",
            spilling.join("\n")
        );
    }
}

//! Where networks run, as library values: a [`Device`] (the CPU, or a CUDA GPU) and the
//! [`DType`] a GPU stores activations and convolution weights in. A network moved to a device
//! is a [`Placed`] value: one variant per backend type, so that code written once over
//! [`Backend`] runs on whichever the network is on ([`on_backend!`]).

use std::sync::Arc;

use half::{bf16, f16};

use crate::backend::{Backend, Cpu, Cuda};
use crate::cuda::{unavailable_reason, Gpu};
use crate::error::{Error, Result};

/// Storage and tensor-core precision on a GPU (the CPU computes in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F16,
    /// For checking against the CPU.
    F32,
}

/// Where networks run.
#[derive(Clone)]
pub enum Device {
    Cpu,
    /// A GPU through one device handle: one context and one stream, shared by every network
    /// on it.
    Cuda(Arc<Gpu>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(gpu) => write!(f, "cuda:{} ({})", gpu.info().ordinal, gpu.info().name),
        }
    }
}

impl Device {
    /// GPU `ordinal`, or an error saying why it cannot run mcdm's kernels.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Device::Cuda(Gpu::new(ordinal)?))
    }

    /// GPU 0 when one is usable, else the CPU. The second value says why a GPU that is
    /// present could not be used (its kernels fail to load, say); it is None when there is no
    /// usable GPU at all, or when the GPU was opened.
    pub fn auto() -> (Self, Option<String>) {
        if unavailable_reason().is_some() {
            return (Device::Cpu, None);
        }
        match Gpu::new(0) {
            Ok(gpu) => (Device::Cuda(gpu), None),
            Err(e) => (Device::Cpu, Some(e.to_string())),
        }
    }

    /// `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` ([`Device::auto`], its reason dropped).
    pub fn parse(spec: &str) -> Result<Self> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::auto().0),
            "cuda" => Device::cuda(0),
            _ => match spec.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(ordinal)) => Device::cuda(ordinal),
                _ => Err(Error::Input(format!(
                    "device `{spec}`: expected cpu, cuda, cuda:N or auto"
                ))),
            },
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            Device::Cpu => None,
            Device::Cuda(gpu) => Some(gpu),
        }
    }

    /// Whether two values are the same device (for a GPU: the same handle, so one stream).
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// `cpu`, or the GPU's name and the storage type: `NVIDIA H200 (Bf16)`.
    pub fn describe(&self, dtype: DType) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(gpu) => format!("{} ({dtype:?})", gpu.info().name),
        }
    }

    /// On a GPU, whether the sampler replays each step's model passes as one CUDA graph
    /// (default on; off launches every kernel from the host, with the same results).
    pub fn set_cuda_graphs(&self, on: bool) {
        if let Device::Cuda(gpu) = self {
            gpu.set_cuda_graphs(on);
        }
    }

    /// Why the last CUDA graph capture failed since the previous call, if one did (the work
    /// then ran launch by launch, with the same results).
    pub fn take_graph_failure(&self) -> Option<String> {
        self.gpu().and_then(|gpu| gpu.take_graph_failure())
    }
}

/// The backend types: the CPU, or a GPU storing `bf16`, `f16` or `f32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cpu,
    Bf16,
    F16,
    F32,
}

impl Kind {
    /// The backend of `dtype` on `device` (the CPU computes in f32 whatever `dtype`).
    pub fn of(device: &Device, dtype: DType) -> Self {
        match (device, dtype) {
            (Device::Cpu, _) => Kind::Cpu,
            (Device::Cuda(_), DType::Bf16) => Kind::Bf16,
            (Device::Cuda(_), DType::F16) => Kind::F16,
            (Device::Cuda(_), DType::F32) => Kind::F32,
        }
    }
}

/// A family of networks with one type per backend: `UNet<B>`, `Bert<B>`, or the backends
/// themselves.
pub trait Family {
    type On<B: Backend>;
}

/// A value of family `F` on one of the backends.
pub enum Placed<F: Family> {
    Cpu(F::On<Cpu>),
    Bf16(F::On<Cuda<bf16>>),
    F16(F::On<Cuda<f16>>),
    F32(F::On<Cuda<f32>>),
}

impl<F: Family> Placed<F> {
    pub fn kind(&self) -> Kind {
        match self {
            Placed::Cpu(_) => Kind::Cpu,
            Placed::Bf16(_) => Kind::Bf16,
            Placed::F16(_) => Kind::F16,
            Placed::F32(_) => Kind::F32,
        }
    }
}

/// The backends themselves, as a family: a [`Placed<Backends>`] is an executor of any kind.
pub struct Backends;

impl Family for Backends {
    type On<B: Backend> = B;
}

/// A backend type that [`on_backend!`] names: how it is opened on a device and how its
/// variant of a [`Placed`] value is reached.
pub trait Placement: Backend {
    /// A new executor of this backend on `device` (the CPU needs none).
    fn open(device: &Device) -> Result<Self>;
    fn get<F: Family>(placed: &Placed<F>) -> Option<&F::On<Self>>;
    fn get_mut<F: Family>(placed: &mut Placed<F>) -> Option<&mut F::On<Self>>;
    fn wrap<F: Family>(value: F::On<Self>) -> Placed<F>;
}

impl Placement for Cpu {
    fn open(_: &Device) -> Result<Self> {
        Ok(Cpu::new())
    }
    fn get<F: Family>(placed: &Placed<F>) -> Option<&F::On<Self>> {
        match placed {
            Placed::Cpu(v) => Some(v),
            _ => None,
        }
    }
    fn get_mut<F: Family>(placed: &mut Placed<F>) -> Option<&mut F::On<Self>> {
        match placed {
            Placed::Cpu(v) => Some(v),
            _ => None,
        }
    }
    fn wrap<F: Family>(value: F::On<Self>) -> Placed<F> {
        Placed::Cpu(value)
    }
}

/// Opens a GPU backend on `device`, which must be a GPU.
fn open_cuda<T: crate::cuda::GpuFloat>(device: &Device) -> Result<Cuda<T>> {
    match device {
        Device::Cuda(gpu) => Ok(Cuda::new(gpu.clone())),
        Device::Cpu => Err(Error::Input(
            "a GPU backend cannot be opened on the CPU device".into(),
        )),
    }
}

macro_rules! gpu_placement {
    ($t:ty, $variant:ident) => {
        impl Placement for Cuda<$t> {
            fn open(device: &Device) -> Result<Self> {
                open_cuda(device)
            }
            fn get<F: Family>(placed: &Placed<F>) -> Option<&F::On<Self>> {
                match placed {
                    Placed::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn get_mut<F: Family>(placed: &mut Placed<F>) -> Option<&mut F::On<Self>> {
                match placed {
                    Placed::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap<F: Family>(value: F::On<Self>) -> Placed<F> {
                Placed::$variant(value)
            }
        }
    };
}

gpu_placement!(bf16, Bf16);
gpu_placement!(f16, F16);
gpu_placement!(f32, F32);

/// Runs `$body` with the type `$B` naming the backend of `$kind` (a [`Kind`]): the one place
/// where a backend type is chosen from a value.
macro_rules! on_backend {
    ($kind:expr, $B:ident => $body:expr) => {
        match $kind {
            $crate::device::Kind::Cpu => {
                type $B = $crate::backend::Cpu;
                $body
            }
            $crate::device::Kind::Bf16 => {
                type $B = $crate::backend::Cuda<half::bf16>;
                $body
            }
            $crate::device::Kind::F16 => {
                type $B = $crate::backend::Cuda<half::f16>;
                $body
            }
            $crate::device::Kind::F32 => {
                type $B = $crate::backend::Cuda<f32>;
                $body
            }
        }
    };
}

pub(crate) use on_backend;

/// Buffers reused across forward passes, on whichever device the passes run: bound to a
/// backend at first use (and again when used on another).
#[derive(Default)]
pub struct Workspace {
    backend: Option<(Device, Placed<Backends>)>,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// This workspace's executor for backend `B` on `device`, opened on first use.
    pub fn backend<B: Placement>(&mut self, device: &Device) -> Result<&mut B> {
        let bound = self
            .backend
            .as_ref()
            .is_some_and(|(d, b)| d.same(device) && B::get(b).is_some());
        if !bound {
            self.backend = Some((device.clone(), B::wrap(B::open(device)?)));
        }
        let (_, placed) = self.backend.as_mut().expect("bound above");
        Ok(B::get_mut(placed).expect("bound above"))
    }
}

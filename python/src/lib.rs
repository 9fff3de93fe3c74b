//! `mcdm._mcdm`: the engine for Python. Arrays in and out are numpy float32 (NCHW); the GIL is
//! released while a network runs; errors become Python exceptions carrying the library's
//! messages. The package `mcdm` (python/mcdm) re-exports this module with its docstrings and
//! type stubs.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mcdm::device::Workspace;
use mcdm::image::{grid, to_rgb8, write_png};
use mcdm::job::compose::{default_batch_size, DEFAULT_NUM_SAMPLES};
use mcdm::job::conditions::init_noise_warning;
use mcdm::job::overrides::{resolve, Overrides};
use mcdm::job::{Job as JobFile, Sampler, TermSpec};
use mcdm::model::{load_model as load, Conditioning, LoadedModel};
use mcdm::sample::StepProgress;
use mcdm::text::TextEncoder;
use mcdm::weights::SafetensorsFile;
use mcdm::{DType, Device, Error};
use numpy::{AllowTypeChange, IntoPyArray, PyArray2, PyArray4, PyArrayLike1, PyArrayLikeDyn};
use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{
    PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyDict, PyList};

/// The library's error as the Python exception a caller expects: MemoryError when a device is
/// out of memory, FileNotFoundError / OSError for files, RuntimeError for the GPU and for
/// results out of range, ValueError for every other bad input.
fn py_err(e: Error) -> PyErr {
    let message = e.to_string();
    match e {
        Error::OutOfMemory { .. } => PyMemoryError::new_err(message),
        Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(message)
        }
        Error::Io { .. } => PyOSError::new_err(message),
        Error::Cuda(_) | Error::Numeric(_) => PyRuntimeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

fn value_err(message: String) -> PyErr {
    PyValueError::new_err(message)
}

/// Emits `message` as a Python `UserWarning` (the library returns warnings; it never prints).
fn warn(py: Python<'_>, message: &str) -> PyResult<()> {
    let warnings = py.import("warnings")?;
    warnings.call_method1(
        "warn",
        (message, py.get_type::<pyo3::exceptions::PyUserWarning>(), 2),
    )?;
    Ok(())
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    match name {
        "bf16" => Ok(DType::Bf16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        _ => Err(value_err(format!(
            "dtype `{name}`: expected bf16, f16 or f32"
        ))),
    }
}

/// `auto` (the GPU when one is usable, with a warning when one is present but unusable),
/// `cpu`, `cuda` or `cuda:N`.
fn open_device(py: Python<'_>, spec: &str) -> PyResult<Device> {
    if spec == "auto" {
        let (device, why) = py.detach(Device::auto);
        if let Some(why) = why {
            warn(
                py,
                &format!("device auto: the GPU cannot be used ({why}); running on the CPU"),
            )?;
        }
        return Ok(device);
    }
    py.detach(|| Device::parse(spec)).map_err(py_err)
}

fn path_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<PathBuf> {
    obj.extract::<PathBuf>()
        .map_err(|_| value_err(format!("{what}: expected a path (str or os.PathLike)")))
}

/// A diffusion model on a device: `forward` runs its UNet.
#[pyclass(module = "mcdm", frozen)]
struct Model {
    inner: LoadedModel,
    /// Buffers kept between calls; one call at a time.
    workspace: Mutex<Workspace>,
}

#[pymethods]
impl Model {
    /// The resolved config (guided-diffusion's flags plus mcdm's extensions) as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let c = &self.inner.config;
        let text = c.unet.to_json(&c.diffusion).to_string();
        py.import("json")?.call_method1("loads", (text,))
    }

    /// The device the model runs on, as `cpu` or `cuda:N (name)`.
    #[getter]
    fn device(&self) -> String {
        format!("{:?}", self.inner.device())
    }

    /// The storage type on a GPU (`f32` on the CPU).
    #[getter]
    fn dtype(&self) -> String {
        format!("{:?}", self.inner.dtype()).to_lowercase()
    }

    /// The file the weights came from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.file.path().to_path_buf()
    }

    /// Number of parameters.
    #[getter]
    fn parameters(&self) -> usize {
        self.inner.parameters()
    }

    /// The UNet's output for `x` `[N, C, H, W]` at timesteps `t` `[N]` (the values the network
    /// sees), with class labels `y` `[N]` or vector conditions `emb` `[N, D]` for models that
    /// take them: float32 `[N, out_channels, H, W]`.
    #[pyo3(signature = (x, t, y=None, emb=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
        t: PyArrayLike1<'py, f32, AllowTypeChange>,
        y: Option<PyArrayLike1<'py, i64, AllowTypeChange>>,
        emb: Option<PyArrayLikeDyn<'py, f32, AllowTypeChange>>,
    ) -> PyResult<Bound<'py, PyArray4<f32>>> {
        let shape: [usize; 4] = x
            .shape()
            .try_into()
            .map_err(|_| value_err(format!("x must be [N, C, H, W], got shape {:?}", x.shape())))?;
        let n = shape[0];
        if t.len() != n {
            return Err(value_err(format!(
                "t has {} values for {n} images",
                t.len()
            )));
        }
        let x = x.as_array().as_standard_layout().into_owned();
        let t = t.as_array().to_vec();
        let y = y.map(|y| y.as_array().to_vec());
        let emb = match emb {
            Some(e) if e.ndim() != 2 || e.shape()[0] != n => {
                return Err(value_err(format!(
                    "emb must be [N, D] with N = {n}, got shape {:?}",
                    e.shape()
                )))
            }
            Some(e) => Some(e.as_array().as_standard_layout().into_owned()),
            None => None,
        };
        let x = x.as_slice().expect("standard layout");
        let out = py
            .detach(|| {
                let cond = Conditioning {
                    timesteps: &t,
                    labels: y.as_deref(),
                    embedding: emb.as_ref().map(|e| e.as_slice().expect("standard layout")),
                };
                let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
                self.inner.forward_nchw(x, shape, &cond, &mut ws)
            })
            .map_err(py_err)?;
        let c = out.len() / (n * shape[2] * shape[3]).max(1);
        out.into_pyarray(py).reshape([n, c, shape[2], shape[3]])
    }

    fn __repr__(&self) -> String {
        format!(
            "mcdm.Model({}, {} parameters, on {})",
            self.inner.file.path().display(),
            self.inner.parameters(),
            self.inner.device().describe(self.inner.dtype())
        )
    }
}

/// Loads a model file (safetensors, PyTorch `.pt`, or a diffusers UNet2DModel folder) with its
/// config (`config`, else `<stem>.json`, the file's metadata, inference) onto `device`.
#[pyfunction]
#[pyo3(signature = (path, config=None, device="auto", dtype="bf16"))]
fn load_model(
    py: Python<'_>,
    path: &Bound<'_, PyAny>,
    config: Option<&Bound<'_, PyAny>>,
    device: &str,
    dtype: &str,
) -> PyResult<Model> {
    let path = path_of(path, "path")?;
    let config = config.map(|c| path_of(c, "config")).transpose()?;
    let dtype = parse_dtype(dtype)?;
    let device = open_device(py, device)?;
    let model = py
        .detach(|| load(&path, config.as_deref())?.to_device(&device, dtype))
        .map_err(py_err)?;
    if let Some(w) = model.config.default_warning() {
        warn(py, &format!("{}: {w}", path.display()))?;
    }
    Ok(Model {
        inner: model,
        workspace: Mutex::new(Workspace::new()),
    })
}

/// A job file: models, terms and settings, as `mcdm sample --job` reads them.
#[pyclass(module = "mcdm", frozen)]
struct Job {
    inner: JobFile,
    path: PathBuf,
}

#[pymethods]
impl Job {
    /// The file it was read from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Model names and paths.
    #[getter]
    fn models(&self) -> Vec<(String, PathBuf)> {
        self.inner.models.clone()
    }

    /// The settings it gives (those it leaves out are absent), as a dict.
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let j = &self.inner;
        let mut m = serde_json::Map::new();
        let mut set = |k: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        set("sampler", j.sampler.map(|s| s.name().into()));
        set("eta", j.eta.map(Into::into));
        set("karras", j.karras.map(Into::into));
        set("steps", j.steps.map(Into::into));
        set(
            "timestep_respacing",
            j.timestep_respacing.clone().map(Into::into),
        );
        set("clip_denoised", j.clip_denoised.map(Into::into));
        set("num_samples", j.num_samples.map(Into::into));
        set("batch_size", j.batch_size.map(Into::into));
        set("seed", j.seed.map(Into::into));
        let text = serde_json::Value::Object(m).to_string();
        py.import("json")?.call_method1("loads", (text,))
    }

    fn __repr__(&self) -> String {
        format!("mcdm.Job({})", self.path.display())
    }
}

/// Reads a job file (`examples/default.json`, a run's `record.json`, ...).
#[pyfunction]
fn load_job(path: &Bound<'_, PyAny>) -> PyResult<Job> {
    let path = path_of(path, "path")?;
    let inner = JobFile::load(&path).map_err(py_err)?;
    Ok(Job { inner, path })
}

/// A term: the `--expert` / `--uncond` syntax (`NAME[,class=K][,image=P][,embedding=P]
/// [,weight=W][,text=PROMPT]`) or a dict with those keys and `model`.
fn term(obj: &Bound<'_, PyAny>, allow_weight: bool, what: &str) -> PyResult<TermSpec> {
    if let Ok(spec) = obj.extract::<String>() {
        return TermSpec::parse(&spec, allow_weight)
            .map_err(|e| value_err(format!("{what} `{spec}`: {e}")));
    }
    if !obj.is_instance_of::<PyDict>() {
        return Err(value_err(format!(
            "{what}: expected a term spec string or a dict, got {obj}"
        )));
    }
    // A dict is a job file's term object: one reader, one set of checks.
    let py = obj.py();
    let os = py.import("os")?;
    let text: String = py
        .import("json")?
        .call_method(
            "dumps",
            (obj,),
            Some(&[("default", os.getattr("fspath")?)].into_py_dict(py)?),
        )?
        .extract()?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| value_err(format!("{what}: {e}")))?;
    TermSpec::from_object(&value, allow_weight).map_err(|e| value_err(format!("{what}: {e}")))
}

/// Samples a composition as `mcdm sample` does (the same images for the same settings),
/// returning float32 `[N, 3, H, W]` in [-1, 1]. See the package's docstring.
#[pyfunction]
#[pyo3(signature = (
    models=None, experts=None, uncond=None, *, job=None, sampler=None, steps=None,
    timestep_respacing=None, eta=None, karras=None, clip_denoised=None, num_samples=None,
    batch_size=None, seed=None, init_noise=None, device="auto", dtype="bf16", text_model=None,
    progress=None
))]
#[allow(clippy::too_many_arguments)]
fn sample<'py>(
    py: Python<'py>,
    models: Option<&Bound<'py, PyDict>>,
    experts: Option<&Bound<'py, PyList>>,
    uncond: Option<&Bound<'py, PyAny>>,
    job: Option<&Bound<'py, PyAny>>,
    sampler: Option<&str>,
    steps: Option<usize>,
    timestep_respacing: Option<String>,
    eta: Option<f32>,
    karras: Option<bool>,
    clip_denoised: Option<bool>,
    num_samples: Option<usize>,
    batch_size: Option<usize>,
    seed: Option<u64>,
    init_noise: Option<&Bound<'py, PyAny>>,
    device: &str,
    dtype: &str,
    text_model: Option<&Bound<'py, PyAny>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    let mut over = Overrides::default();
    if let Some(models) = models {
        for (name, path) in models.iter() {
            let name: String = name.extract()?;
            over.models
                .push((name.clone(), path_of(&path, &format!("model `{name}`"))?));
        }
    }
    if let Some(experts) = experts {
        for (i, e) in experts.iter().enumerate() {
            over.experts.push(term(&e, true, &format!("expert {i}"))?);
        }
        if experts.is_empty() {
            return Err(value_err(
                "experts: an empty list composes nothing (leave it out to keep the job's)".into(),
            ));
        }
    }
    over.uncond = uncond.map(|u| term(u, false, "uncond")).transpose()?;
    over.sampler = sampler
        .map(|s| {
            Sampler::parse(s).ok_or_else(|| {
                value_err(format!(
                    "sampler `{s}`: expected one of {}",
                    Sampler::names()
                ))
            })
        })
        .transpose()?;
    // The keywords' own conflicts, named as keywords (a job's are named by Job::settings).
    if let Some(e) = eta {
        if !(0.0..=1.0).contains(&e) {
            return Err(value_err(format!(
                "eta must be between 0 (deterministic) and 1, got {e}"
            )));
        }
        match over.sampler {
            Some(s) if s != Sampler::Ddim && e != 0.0 => {
                return Err(value_err(format!(
                    "eta {e} is a DDIM setting: {} sampling has no eta",
                    s.name()
                )))
            }
            _ => {}
        }
    }
    if let (Some(true), Some(s @ (Sampler::Ddim | Sampler::Ddpm))) = (karras, over.sampler) {
        return Err(value_err(format!(
            "karras chooses a solver's sigmas: use it with sampler dpmpp-2m, dpmpp-3m or unipc, \
             not {}",
            s.name()
        )));
    }
    if steps == Some(0) || num_samples == Some(0) || batch_size == Some(0) {
        return Err(value_err(
            "steps, num_samples and batch_size must be positive".into(),
        ));
    }
    over.steps = steps;
    over.timestep_respacing = timestep_respacing;
    over.eta = eta;
    over.karras = karras;
    over.clip_denoised = clip_denoised;
    over.num_samples = num_samples;
    over.batch_size = batch_size;
    over.seed = seed;
    // Initial noise: an array here, or a safetensors file with `x_T` as in a job.
    let mut noise_array = None;
    if let Some(obj) = init_noise {
        if let Ok(a) = obj.extract::<PyArrayLikeDyn<'py, f32, AllowTypeChange>>() {
            noise_array = Some((
                a.shape().to_vec(),
                a.as_array().iter().copied().collect::<Vec<f32>>(),
            ));
        } else {
            over.init_noise = Some(path_of(obj, "init_noise")?);
        }
    }
    let job_file = match job {
        Some(j) => match j.cast::<Job>() {
            Ok(j) => Some(j.get().path.clone()),
            Err(_) => Some(path_of(j, "job")?),
        },
        None => None,
    };
    let text_model = text_model.map(|t| path_of(t, "text_model")).transpose()?;
    let dtype = parse_dtype(dtype)?;
    let device = open_device(py, device)?;
    let dtype = if device.is_cpu() { DType::F32 } else { dtype };

    let resolved = resolve(job_file.as_deref(), &over).map_err(py_err)?;
    let job = resolved.job;
    let settings = job.settings().map_err(py_err)?;
    let n = job.num_samples.unwrap_or(DEFAULT_NUM_SAMPLES);
    let composition = py
        .detach(|| job.composition(n, &device, dtype, text_model.as_deref()))
        .map_err(py_err)?;
    for name in &composition.unused {
        if !resolved.shipped.contains(name) {
            warn(
                py,
                &format!("model `{name}` is not used by uncond or any expert: not loaded"),
            )?;
        }
    }
    for w in &composition.warnings {
        warn(py, w)?;
    }
    let [h, w] = composition.size;
    let noise = match (noise_array, &job.init_noise) {
        (Some((shape, values)), _) => {
            if shape != [n, 3, h, w] {
                return Err(value_err(format!(
                    "init_noise has shape {shape:?}, expected [{n}, 3, {h}, {w}] (num_samples {n})"
                )));
            }
            Some(values)
        }
        (None, Some(path)) => {
            let noise = read_noise(path, [n, 3, h, w]).map_err(py_err)?;
            if let Some(w) = init_noise_warning(path, &noise) {
                warn(py, &w)?;
            }
            Some(noise)
        }
        (None, None) => None,
    };
    let spec = composition.spec(&settings);
    let sampler = composition.sampler(spec).map_err(py_err)?;
    let batch = job
        .batch_size
        .unwrap_or_else(|| default_batch_size(n, &device));

    // Between steps: the progress callback, and Ctrl-C (Python's signal handlers run only
    // while the GIL is held, so it is taken briefly to check).
    let mut stopped: Option<PyErr> = None;
    let mut images = Vec::with_capacity(n * 3 * h * w);
    let result = py.detach(|| {
        sampler.sample_each(
            0..n,
            batch,
            noise.as_deref(),
            &mut |p: StepProgress| {
                Python::attach(|py| {
                    let outcome = py.check_signals().and_then(|()| match &progress {
                        Some(f) => f.call1(py, (p.first, p.batch, p.step, p.steps)).map(|_| ()),
                        None => Ok(()),
                    });
                    match outcome {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(e) => {
                            stopped = Some(e);
                            ControlFlow::Break(())
                        }
                    }
                })
            },
            &mut |_, batch| {
                images.extend_from_slice(batch);
                Ok(())
            },
        )
    });
    if let Some(e) = stopped {
        return Err(e);
    }
    result.map_err(py_err)?;
    images.into_pyarray(py).reshape([n, 3, h, w])
}

/// `x_T` of a safetensors file, of shape `shape`.
fn read_noise(path: &Path, shape: [usize; 4]) -> mcdm::Result<Vec<f32>> {
    let file = SafetensorsFile::open(path)?;
    let got = file.shape("x_T")?;
    if got != shape {
        return Err(Error::Input(format!(
            "init_noise {}: `x_T` is {got:?}, expected {shape:?}",
            path.display()
        )));
    }
    file.f32("x_T")
}

/// Sentence embeddings of `texts` (the text expert's conditions): float32 `[len(texts), D]`,
/// on the CPU in f32 (as `mcdm sample` encodes prompts).
#[pyfunction]
#[pyo3(signature = (texts, text_model=None))]
fn encode_text<'py>(
    py: Python<'py>,
    texts: Vec<String>,
    text_model: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let dir = text_model.map(|t| path_of(t, "text_model")).transpose()?;
    if texts.is_empty() {
        return Err(value_err("texts: give at least one text".into()));
    }
    let (values, dim) = py
        .detach(|| {
            let encoder = TextEncoder::load(&TextEncoder::locate(dir.as_deref())?)?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            Ok::<_, Error>((encoder.encode(&refs)?, encoder.dim()))
        })
        .map_err(py_err)?;
    values.into_pyarray(py).reshape([texts.len(), dim])
}

/// Writes `images` (`[N, 3, H, W]` in [-1, 1], as `sample` returns them) as one PNG grid of
/// `columns` columns (default: as square as it gets), quantised as the reference scripts do;
/// the file appears whole or not at all.
#[pyfunction]
#[pyo3(signature = (images, path, columns=None))]
fn save_grid<'py>(
    py: Python<'py>,
    images: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
    path: &Bound<'py, PyAny>,
    columns: Option<usize>,
) -> PyResult<()> {
    let path = path_of(path, "path")?;
    let [n, c, h, w]: [usize; 4] = images
        .shape()
        .try_into()
        .ok()
        .filter(|s: &[usize; 4]| s[1] == 3 && s[0] > 0)
        .ok_or_else(|| {
            value_err(format!(
                "images must be [N, 3, H, W] with N > 0, got shape {:?}",
                images.shape()
            ))
        })?;
    let values = images.as_array().as_standard_layout().into_owned();
    let values = values.as_slice().expect("standard layout");
    let columns = columns.unwrap_or((n as f64).sqrt().ceil() as usize);
    py.detach(|| {
        let rgb: Vec<Vec<u8>> = values.chunks(c * h * w).map(|x| to_rgb8(x, h, w)).collect();
        let (pixels, gh, gw) = grid(&rgb, h, w, columns);
        write_png(&path, &pixels, gh, gw)
    })
    .map_err(py_err)
}

#[pymodule]
fn _mcdm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Model>()?;
    m.add_class::<Job>()?;
    m.add_function(wrap_pyfunction!(load_model, m)?)?;
    m.add_function(wrap_pyfunction!(load_job, m)?)?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    m.add_function(wrap_pyfunction!(encode_text, m)?)?;
    m.add_function(wrap_pyfunction!(save_grid, m)?)?;
    Ok(())
}

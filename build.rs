//! Compiles the CUDA kernels (`kernels/*.cu`) with NVRTC at build time, when NVRTC is available.
//!
//! NVRTC (libnvrtc.so) is looked up, in this order:
//! 1. `MCDM_NVRTC_LIB` = path of libnvrtc.so.* and `MCDM_CUDA_INCLUDE` = directory holding
//!    cuda_fp16.h / cuda_bf16.h (when only the library is given, `<lib>/../include`);
//! 2. `<repo>/.nvrtc/nvidia/cu13/{lib/libnvrtc.so.13,include}`, what `scripts/install-nvrtc.sh`
//!    installs (from PyPI: nvidia-cuda-nvrtc 13.0.88, nvidia-cuda-runtime 13.0.96);
//! 3. nothing: the build still succeeds, with a `cargo:warning` saying how to install it, and
//!    the crate gets no precompiled images (it can still compile `KERNEL_SOURCES` at run time).
//!
//! Every `kernels/*.cu` file is one translation unit (it includes `common.cuh`, given to NVRTC as
//! a header, and the CUDA headers through `--include-path`), compiled to a CUBIN for each of
//! `CUBIN_ARCHS` and to PTX for `PTX_ARCH` (newer GPUs JIT it). A compile error fails the build
//! with NVRTC's log. `MCDM_REQUIRE_NVRTC=1` turns a missing NVRTC into an error too, and
//! `MCDM_REQUIRE_ALL_CHECKS=1` (CI) also an NVRTC that gives no ptxas report.
//!
//! Output: `$OUT_DIR/kernels.rs`, for `include!(concat!(env!("OUT_DIR"), "/kernels.rs"))`:
//! - `KERNEL_SOURCES: &[(&str, &str)]`: (file stem, source text) of every kernel file;
//! - `KERNEL_HEADERS: &[(&str, &str)]`: (include name, text) of the headers they include
//!   (`common.cuh`), to pass to nvrtcCreateProgram for a run-time compilation;
//! - `KERNEL_OPTIONS: &[(&str, &[&str])]`: (file stem, NVRTC options besides the architecture
//!   and the CUDA include path) used for that file;
//! - `KERNEL_IMAGES: &[(&str, &str, &[u8])]`: (file stem, "sm_80".."sm_90" for a CUBIN or
//!   "compute_90" for PTX, image bytes; PTX is NUL-terminated text); empty without NVRTC;
//! - `KERNEL_RESOURCES: &[KernelResources]`: registers, static shared memory, stack and spills of
//!   every kernel of every CUBIN, from ptxas's report (`--ptxas-options=-v`, read by
//!   `src/cuda/ptxas_report.rs`); the including module defines `KernelResources`;
//! - `NVRTC_VERSION: Option<(i32, i32)>`: the NVRTC that built the images.
//!
//! And `$OUT_DIR/kernel_interface.rs`, whatever NVRTC (see [`kernel_interface`]): the kernels'
//! argument structs and integer constants, mirrored from their one declaration in kernels/.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[path = "src/cuda/ptxas_report.rs"]
mod ptxas_report;

/// Real GPU architectures that get a CUBIN (A100, A10/RTX 30, L4/RTX 40, H100/H200).
const CUBIN_ARCHS: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90"];
/// Virtual architecture of the PTX fallback (JIT-compiled by the driver on newer GPUs).
const PTX_ARCH: &str = "compute_90";
/// Options of every kernel file. No fast math: IEEE division and square root, denormals kept;
/// fmad stays on (the default) except where a file's extra options turn it off.
const COMMON_OPTIONS: &[&str] = &[
    "-std=c++17",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
];
/// Extra options per file stem. step.cu must match the CPU bit for bit: it spells out every
/// rounding with intrinsics, and contraction is also switched off for the whole file.
const EXTRA_OPTIONS: &[(&str, &[&str])] = &[("step", &["--fmad=false"])];
/// Headers the kernel files include (given to NVRTC by name, not through the include path).
const HEADERS: &[&str] = &["common.cuh"];

const INSTALL_HINT: &str = "to compile them, run `scripts/install-nvrtc.sh` (pip-installs NVRTC \
    13.0 into <repo>/.nvrtc/, found there automatically) and build again, or set \
    MCDM_NVRTC_LIB=/path/to/libnvrtc.so.13 and MCDM_CUDA_INCLUDE=/path/to/cuda/include (the \
    directory with cuda_fp16.h)";

type NvrtcResult = c_int;
type NvrtcProgram = *mut c_void;

type CreateProgramFn = unsafe extern "C" fn(
    *mut NvrtcProgram,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> NvrtcResult;
type CompileProgramFn =
    unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> NvrtcResult;
type GetSizeFn = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult;
type GetDataFn = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult;
type DestroyProgramFn = unsafe extern "C" fn(*mut NvrtcProgram) -> NvrtcResult;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult;
type GetErrorStringFn = unsafe extern "C" fn(NvrtcResult) -> *const c_char;

/// The NVRTC entry points, resolved once from the loaded library.
struct Nvrtc {
    _lib: libloading::Library,
    /// libnvrtc-builtins, loaded first by its full path: NVRTC dlopens it by file name only, which
    /// then finds the already loaded copy instead of searching LD_LIBRARY_PATH.
    _builtins: Option<libloading::Library>,
    create_program: CreateProgramFn,
    compile_program: CompileProgramFn,
    get_program_log_size: GetSizeFn,
    get_program_log: GetDataFn,
    get_cubin_size: GetSizeFn,
    get_cubin: GetDataFn,
    get_ptx_size: GetSizeFn,
    get_ptx: GetDataFn,
    destroy_program: DestroyProgramFn,
    version: VersionFn,
    get_error_string: GetErrorStringFn,
}

// The function pointers are plain C entry points; NVRTC is thread safe for distinct programs.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

impl Nvrtc {
    fn load(path: &Path) -> Result<Self, String> {
        // SAFETY: loading NVRTC runs its (trusted) initialisers; the symbol types below are the
        // C prototypes of nvrtc.h.
        unsafe {
            let builtins = match find_builtins(path) {
                Some(b) => Some(
                    libloading::Library::new(&b)
                        .map_err(|e| format!("cannot load {}: {e}", b.display()))?,
                ),
                None => None,
            };
            let lib = libloading::Library::new(path)
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes())
                        .map_err(|e| format!("{} lacks {}: {e}", path.display(), $name))?
                };
            }
            Ok(Nvrtc {
                create_program: sym!("nvrtcCreateProgram"),
                compile_program: sym!("nvrtcCompileProgram"),
                get_program_log_size: sym!("nvrtcGetProgramLogSize"),
                get_program_log: sym!("nvrtcGetProgramLog"),
                get_cubin_size: sym!("nvrtcGetCUBINSize"),
                get_cubin: sym!("nvrtcGetCUBIN"),
                get_ptx_size: sym!("nvrtcGetPTXSize"),
                get_ptx: sym!("nvrtcGetPTX"),
                destroy_program: sym!("nvrtcDestroyProgram"),
                version: sym!("nvrtcVersion"),
                get_error_string: sym!("nvrtcGetErrorString"),
                _lib: lib,
                _builtins: builtins,
            })
        }
    }

    fn version(&self) -> Result<(i32, i32), String> {
        let (mut major, mut minor) = (0, 0);
        self.check(
            unsafe { (self.version)(&mut major, &mut minor) },
            "nvrtcVersion",
        )?;
        Ok((major, minor))
    }

    fn check(&self, code: NvrtcResult, what: &str) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        let msg = unsafe {
            let p = (self.get_error_string)(code);
            if p.is_null() {
                String::from("?")
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(format!("{what} failed: {msg} ({code})"))
    }

    /// Compiles one translation unit; returns the CUBIN (arch `sm_*`) or the NUL-terminated PTX
    /// (arch `compute_*`) with NVRTC's log, or the log on failure.
    fn compile(
        &self,
        name: &str,
        source: &str,
        headers: &[(String, String)],
        options: &[String],
    ) -> Result<(Vec<u8>, String), String> {
        let c_source = CString::new(source).map_err(|_| format!("{name}: NUL in source"))?;
        let c_name = CString::new(name).unwrap();
        let header_texts: Vec<CString> = headers
            .iter()
            .map(|(_, t)| CString::new(t.as_str()).unwrap())
            .collect();
        let header_names: Vec<CString> = headers
            .iter()
            .map(|(n, _)| CString::new(n.as_str()).unwrap())
            .collect();
        let header_text_ptrs: Vec<*const c_char> =
            header_texts.iter().map(|s| s.as_ptr()).collect();
        let header_name_ptrs: Vec<*const c_char> =
            header_names.iter().map(|s| s.as_ptr()).collect();
        let c_options: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()).unwrap())
            .collect();
        let option_ptrs: Vec<*const c_char> = c_options.iter().map(|s| s.as_ptr()).collect();
        let ptx = options
            .iter()
            .any(|o| o.starts_with("--gpu-architecture=compute_"));

        let mut prog: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the program is destroyed below.
        unsafe {
            self.check(
                (self.create_program)(
                    &mut prog,
                    c_source.as_ptr(),
                    c_name.as_ptr(),
                    header_text_ptrs.len() as c_int,
                    header_text_ptrs.as_ptr(),
                    header_name_ptrs.as_ptr(),
                ),
                "nvrtcCreateProgram",
            )?;
            let compiled =
                (self.compile_program)(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr());
            let log = self.log(prog);
            let result = if compiled != 0 {
                let err = self.check(compiled, "nvrtcCompileProgram").unwrap_err();
                Err(format!("{err}\n{log}"))
            } else {
                let (size_fn, data_fn) = if ptx {
                    (self.get_ptx_size, self.get_ptx)
                } else {
                    (self.get_cubin_size, self.get_cubin)
                };
                let mut size = 0usize;
                match self.check(size_fn(prog, &mut size), "nvrtcGet{CUBIN,PTX}Size") {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let mut data = vec![0u8; size];
                        self.check(
                            data_fn(prog, data.as_mut_ptr() as *mut c_char),
                            "nvrtcGet{CUBIN,PTX}",
                        )
                        .map(|()| data)
                    }
                }
            };
            let _ = (self.destroy_program)(&mut prog);
            // Warnings are shown (once per file, for the first architecture) but do not fail;
            // ptxas's resource report (--ptxas-options=-v) is not a warning.
            if result.is_ok() && options.iter().any(|o| o.ends_with(CUBIN_ARCHS[0])) {
                for line in log
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with("ptxas"))
                    .take(20)
                {
                    println!("cargo:warning=nvrtc {name}: {line}");
                }
            }
            result.map(|image| (image, log))
        }
    }

    unsafe fn log(&self, prog: NvrtcProgram) -> String {
        let mut size = 0usize;
        if (self.get_program_log_size)(prog, &mut size) != 0 || size <= 1 {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        if (self.get_program_log)(prog, buf.as_mut_ptr() as *mut c_char) != 0 {
            return String::new();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }
}

/// libnvrtc-builtins.so.* beside libnvrtc (not the `.alt` variant), if there is one.
fn find_builtins(nvrtc: &Path) -> Option<PathBuf> {
    let dir = nvrtc.parent()?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Where NVRTC and the CUDA headers are, or why they were not found.
fn locate(repo: &Path) -> Result<(PathBuf, PathBuf), String> {
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let (lib, include) = match env_path("MCDM_NVRTC_LIB") {
        Some(lib) => {
            let include = env_path("MCDM_CUDA_INCLUDE")
                .unwrap_or_else(|| lib.parent().unwrap_or(Path::new(".")).join("../include"));
            (lib, include)
        }
        None => {
            let base = repo.join(".nvrtc/nvidia/cu13");
            let include = env_path("MCDM_CUDA_INCLUDE").unwrap_or_else(|| base.join("include"));
            (base.join("lib/libnvrtc.so.13"), include)
        }
    };
    if !lib.is_file() {
        return Err(format!("NVRTC not found at {}", lib.display()));
    }
    if !include.join("cuda_fp16.h").is_file() || !include.join("cuda_bf16.h").is_file() {
        return Err(format!(
            "CUDA headers (cuda_fp16.h, cuda_bf16.h) not found in {}",
            include.display()
        ));
    }
    Ok((lib, include))
}

/// Rust string literal of a path (for include_str!/include_bytes!).
fn lit(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("non-UTF-8 path"))
}

fn main() {
    let repo = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernel_dir = repo.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    let all_checks_required = std::env::var_os("MCDM_REQUIRE_ALL_CHECKS").is_some_and(|v| v == "1");
    for var in [
        "MCDM_NVRTC_LIB",
        "MCDM_CUDA_INCLUDE",
        "MCDM_REQUIRE_NVRTC",
        "MCDM_REQUIRE_ALL_CHECKS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(&kernel_dir)
        .expect("kernels/ directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().to_string(), p))
        .collect();
    files.sort();
    let headers: Vec<(String, String)> = HEADERS
        .iter()
        .map(|h| {
            let text = std::fs::read_to_string(kernel_dir.join(h)).expect("kernel header");
            (h.to_string(), text)
        })
        .collect();
    let options_of = |stem: &str| -> Vec<String> {
        let extra = EXTRA_OPTIONS
            .iter()
            .find(|(s, _)| *s == stem)
            .map_or(&[][..], |(_, o)| *o);
        COMMON_OPTIONS
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };

    let (interface, layout_checks) = kernel_interface(&files, &kernel_dir).unwrap_or_else(|e| {
        eprintln!("error: kernels/: {e}");
        std::process::exit(1);
    });
    std::fs::write(out_dir.join("kernel_interface.rs"), interface).unwrap();
    // NVRTC compiles each file with its structs' layout asserted, as rustc asserts the mirrors'.
    let layout_check = |stem: &str| -> String {
        layout_checks
            .iter()
            .filter(|(file, _)| file == &format!("{stem}.cu"))
            .map(|(_, checks)| checks.as_str())
            .collect()
    };

    let mut rs = String::from("// Generated by build.rs: the CUDA kernels of kernels/.\n\n");
    rs += "/// (file stem, CUDA source) of every kernels/*.cu.\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n";
    for (stem, path) in &files {
        writeln!(rs, "    ({stem:?}, include_str!({})),", lit(path)).unwrap();
    }
    rs += "];\n\n/// (include name, text) of the headers the kernel files include.\npub const KERNEL_HEADERS: &[(&str, &str)] = &[\n";
    for h in HEADERS {
        writeln!(
            rs,
            "    ({h:?}, include_str!({})),",
            lit(&kernel_dir.join(h))
        )
        .unwrap();
    }
    rs += "];\n\n/// (file stem, NVRTC options besides --gpu-architecture and --include-path).\npub const KERNEL_OPTIONS: &[(&str, &[&str])] = &[\n";
    for (stem, _) in &files {
        writeln!(rs, "    ({stem:?}, &{:?}),", options_of(stem)).unwrap();
    }
    rs += "];\n\n";

    let located = locate(&repo);
    if let Ok((lib, _)) = &located {
        println!("cargo:rerun-if-changed={}", lib.display());
    }
    let nvrtc = located.and_then(|(lib, include)| {
        let nvrtc = Nvrtc::load(&lib)?;
        let version = nvrtc.version()?;
        Ok((nvrtc, version, include))
    });
    let (nvrtc, version, include) = match nvrtc {
        Ok(found) => found,
        Err(why) => {
            if std::env::var_os("MCDM_REQUIRE_NVRTC").is_some_and(|v| v == "1")
                || all_checks_required
            {
                eprintln!(
                    "error: MCDM_REQUIRE_NVRTC=1 or MCDM_REQUIRE_ALL_CHECKS=1, but {why}: \
                     {INSTALL_HINT}"
                );
                std::process::exit(1);
            }
            println!("cargo:warning=CUDA kernels not precompiled ({why}): {INSTALL_HINT}");
            rs += "/// (file stem, architecture, CUBIN or NUL-terminated PTX): none, NVRTC was not found at build time.\n";
            rs += "pub const KERNEL_IMAGES: &[(&str, &str, &[u8])] = &[];\n\n";
            rs += "/// What ptxas reported for every kernel of every CUBIN (none).\npub const KERNEL_RESOURCES: &[KernelResources] = &[];\n\n";
            rs += "/// The NVRTC that compiled KERNEL_IMAGES (none).\npub const NVRTC_VERSION: Option<(i32, i32)> = None;\n";
            std::fs::write(out_dir.join("kernels.rs"), rs).unwrap();
            return;
        }
    };

    // One job per (file, architecture), spread over a few threads (NVRTC is thread safe).
    let image_dir = out_dir.join("kernel-images");
    std::fs::create_dir_all(&image_dir).unwrap();
    let archs: Vec<&str> = CUBIN_ARCHS.iter().copied().chain([PTX_ARCH]).collect();
    let jobs: Vec<(usize, &str)> = (0..files.len())
        .flat_map(|f| archs.iter().map(move |&a| (f, a)))
        .collect();
    let next = Mutex::new(0usize);
    type JobResult = Result<(PathBuf, Vec<ptxas_report::Resources>), String>;
    let results: Mutex<Vec<Option<JobResult>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.min(jobs.len()) {
            s.spawn(|| loop {
                let j = {
                    let mut n = next.lock().unwrap();
                    let j = *n;
                    *n += 1;
                    j
                };
                if j >= jobs.len() {
                    break;
                }
                let (f, arch) = jobs[j];
                let (stem, path) = &files[f];
                let source =
                    std::fs::read_to_string(path).expect("kernel source") + &layout_check(stem);
                let mut options = vec![
                    format!("--gpu-architecture={arch}"),
                    format!("--include-path={}", include.display()),
                ];
                options.extend(options_of(stem));
                let cubin = arch.starts_with("sm_");
                let name = format!("{stem}.cu");
                let plain = || nvrtc.compile(&name, &source, &headers, &options);
                let compiled = if cubin {
                    // ptxas's report, where this NVRTC takes the option (same image either way).
                    let mut verbose = options.clone();
                    verbose.push("--ptxas-options=-v".into());
                    match nvrtc.compile(&name, &source, &headers, &verbose) {
                        Err(e) if e.contains("NVRTC_ERROR_INVALID_OPTION") => {
                            if all_checks_required {
                                Err(format!(
                                    "this NVRTC refuses --ptxas-options=-v, so the register \
                                     spill check cannot run (MCDM_REQUIRE_ALL_CHECKS=1): {e}"
                                ))
                            } else {
                                plain()
                            }
                        }
                        result => result,
                    }
                } else {
                    plain()
                };
                let result = compiled.and_then(|(image, log)| {
                    let ext = if cubin { "cubin" } else { "ptx" };
                    let out = image_dir.join(format!("{stem}.{arch}.{ext}"));
                    std::fs::write(&out, image)
                        .map_err(|e| format!("writing {}: {e}", out.display()))?;
                    let kernels = if cubin {
                        ptxas_report::parse(&log)?
                    } else {
                        Vec::new()
                    };
                    Ok((out, kernels))
                });
                results.lock().unwrap()[j] = Some(result);
            });
        }
    });
    let results = results.into_inner().unwrap();
    // file stem -> (log, architectures that failed with it), in job order.
    let mut failures: Vec<(String, String, Vec<&str>)> = Vec::new();
    rs += "/// (file stem, architecture, CUBIN for sm_*, NUL-terminated PTX for compute_*).\npub const KERNEL_IMAGES: &[(&str, &str, &[u8])] = &[\n";
    let mut resources = String::from(
        "/// What ptxas reported for every kernel of every CUBIN.\npub const KERNEL_RESOURCES: &[KernelResources] = &[\n",
    );
    for (&(f, arch), result) in jobs.iter().zip(results) {
        let stem = &files[f].0;
        match result.expect("job ran") {
            Ok((path, kernels)) => {
                writeln!(
                    rs,
                    "    ({stem:?}, {arch:?}, include_bytes!({})),",
                    lit(&path)
                )
                .unwrap();
                for k in kernels {
                    writeln!(
                        resources,
                        "    KernelResources {{ file: {stem:?}, arch: {arch:?}, kernel: {:?}, registers: {}, \
                         static_shared_bytes: {}, stack_bytes: {}, spill_store_bytes: {}, spill_load_bytes: {} }},",
                        k.kernel,
                        k.registers,
                        k.static_shared_bytes,
                        k.stack_bytes,
                        k.spill_store_bytes,
                        k.spill_load_bytes
                    )
                    .unwrap();
                }
            }
            Err(log) => match failures.iter_mut().find(|(s, l, _)| s == stem && *l == log) {
                Some((_, _, archs)) => archs.push(arch),
                None => failures.push((stem.clone(), log, vec![arch])),
            },
        }
    }
    if !failures.is_empty() {
        // A plain message (no panic backtrace): cargo shows the build script's stderr.
        eprintln!(
            "error: CUDA kernel compilation failed (NVRTC {}.{})",
            version.0, version.1
        );
        for (stem, log, archs) in &failures {
            eprintln!(
                "\n==== kernels/{stem}.cu ({}) ====\n{}",
                archs.join(", "),
                log.trim_end()
            );
        }
        std::process::exit(1);
    }
    rs += "];\n\n";
    rs += &resources;
    rs += "];\n\n";
    writeln!(
        rs,
        "/// The NVRTC that compiled KERNEL_IMAGES.\npub const NVRTC_VERSION: Option<(i32, i32)> = Some(({}, {}));",
        version.0, version.1
    )
    .unwrap();
    std::fs::write(out_dir.join("kernels.rs"), rs).unwrap();
    eprintln!(
        "compiled {} kernel images with NVRTC {}.{} in {:.1?}",
        jobs.len(),
        version.0,
        version.1,
        started.elapsed()
    );
}

/// A field type of a kernel argument struct: its Rust mirror, size and alignment.
fn field_type(c: &str) -> Option<(&'static str, usize, usize)> {
    Some(match c {
        t if t.ends_with('*') => ("u64", 8, 8),
        "int" => ("i32", 4, 4),
        "unsigned" | "unsigned int" => ("u32", 4, 4),
        "float" => ("f32", 4, 4),
        "long long" => ("i64", 8, 8),
        // common.cuh's fused-step scalars, mirrored by hand with the same size check.
        "StepParams" => ("crate::diffusion::StepParams", 112, 4),
        _ => return None,
    })
}

/// The kernels' interface, from its one declaration in `kernels/`:
/// - every argument struct, declared as `#define NAME_FIELDS(F) F(type, field) ...` then
///   `MCDM_ARGS(NAME)` (common.cuh), becomes a `#[repr(C)]` Rust struct `NAME` of the same
///   layout (pointers as u64 device addresses; explicit padding, so it is plain data). The
///   layout is computed here by C's rules and asserted on both sides: rustc checks the mirror's
///   offsets and size (const asserts in the generated file), NVRTC each field's size and
///   alignment and the struct's size, which with the one field order fix its offsets
///   (static_asserts appended to the file's source, returned per file);
/// - every `#define NAME <integer>` (tile sizes, threads, stages) becomes `pub const NAME: usize`,
///   so the launcher sizes grids and shared memory from the numbers the kernels use.
fn kernel_interface(
    files: &[(String, PathBuf)],
    kernel_dir: &Path,
) -> Result<(String, Vec<(String, String)>), String> {
    let mut sources: Vec<(String, String)> = HEADERS
        .iter()
        .map(|h| {
            (
                h.to_string(),
                std::fs::read_to_string(kernel_dir.join(h)).unwrap(),
            )
        })
        .collect();
    for (stem, path) in files {
        sources.push((format!("{stem}.cu"), std::fs::read_to_string(path).unwrap()));
    }
    let mut rs = String::from(
        "// Generated by build.rs from the argument structs and constants of kernels/.\n\n",
    );
    let mut checks = Vec::new();
    let mut consts: Vec<(String, String)> = Vec::new();
    for (file, text) in &sources {
        // Continuation lines joined, so that a #define is one line.
        let joined = text.replace("\\\n", " ");
        let mut c_checks = String::new();
        for line in joined.lines() {
            let Some(def) = line.trim_start().strip_prefix("#define ") else {
                continue;
            };
            let (name, rest) = def.split_once([' ', '(']).unwrap_or((def, ""));
            if let Some(args) = name.strip_suffix("_FIELDS") {
                let body = rest.strip_prefix("F)").ok_or_else(|| {
                    format!("{file}: `#define {name}` must take (F): `#define {name}(F) F(type, name) ...`")
                })?;
                let (def_rs, c) = args_struct(file, args, body)?;
                rs += &def_rs;
                c_checks += &c;
                continue;
            }
            let value = rest.split("//").next().unwrap_or("").trim();
            let is_const_name = name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if is_const_name && !value.is_empty() && value.chars().all(|c| c.is_ascii_digit()) {
                if let Some((_, other)) = consts.iter().find(|(n, _)| n == name) {
                    return Err(format!("{name} is defined in {other} and in {file}"));
                }
                writeln!(rs, "/// `kernels/{file}`: `#define {name} {value}`.\npub const {name}: usize = {value};").unwrap();
                consts.push((name.to_string(), file.clone()));
            }
        }
        if !c_checks.is_empty() {
            checks.push((
                file.clone(),
                format!("\n// Appended by build.rs: the layout the Rust mirrors have.\n{c_checks}"),
            ));
        }
    }
    Ok((rs, checks))
}

/// The Rust mirror of one argument struct `name` of `kernels/<file>`, with const asserts of
/// its layout, and the C++ static_asserts of the same layout, from the body of its `_FIELDS(F)`
/// macro.
fn args_struct(file: &str, name: &str, body: &str) -> Result<(String, String), String> {
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find("F(") {
        let inner = &rest[at + 2..];
        let end = inner
            .find(')')
            .ok_or_else(|| format!("{file}: {name}: unclosed F("))?;
        let (ty, field) = inner[..end].rsplit_once(',').ok_or_else(|| {
            format!(
                "{file}: {name}: F(type, name) expected, got F({})",
                &inner[..end]
            )
        })?;
        // `__restrict__` qualifies the kernel's parameter; the Rust mirror needs only the type.
        let ty = ty
            .split_whitespace()
            .filter(|w| *w != "__restrict__")
            .collect::<Vec<_>>()
            .join(" ");
        let ty = ty.strip_prefix("const ").unwrap_or(&ty).replace(" *", "*");
        let (rust, size, align) = field_type(&ty).ok_or_else(|| {
            format!(
                "{file}: {name}.{}: type `{ty}` has no Rust mirror",
                field.trim()
            )
        })?;
        fields.push((field.trim().to_string(), rust, size, align));
        rest = &inner[end + 1..];
    }
    if fields.is_empty() {
        return Err(format!("{file}: {name} has no fields"));
    }
    let mut def = format!(
        "/// The arguments of the `kernels/{file}` kernels that take `{name}` (declared there).\n\
         #[repr(C)]\n#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]\npub struct {name} {{\n"
    );
    let mut rust_checks = String::new();
    let mut c_checks = String::new();
    let mut offsets = Vec::new();
    let (mut offset, mut max_align, mut pads) = (0usize, 1usize, 0);
    for (field, rust, size, align) in &fields {
        if offset % align != 0 {
            let gap = align - offset % align;
            writeln!(def, "    pub _pad{pads}: [u8; {gap}],").unwrap();
            pads += 1;
            offset += gap;
        }
        writeln!(def, "    pub {field}: {rust},").unwrap();
        offsets.push(offset.to_string());
        writeln!(
            rust_checks,
            "const _: () = assert!(std::mem::offset_of!({name}, {field}) == {offset});"
        )
        .unwrap();
        // NVRTC has no offsetof: each field's size and alignment, with the order the one
        // declaration gives both sides and the total size, fix every offset.
        writeln!(c_checks, "static_assert(sizeof(decltype({name}::{field})) == {size} && alignof(decltype({name}::{field})) == {align}, \"{name}.{field}: Rust has {size} bytes aligned to {align}\");").unwrap();
        offset += size;
        max_align = max_align.max(*align);
    }
    if offset % max_align != 0 {
        let gap = max_align - offset % max_align;
        writeln!(def, "    pub _pad{pads}: [u8; {gap}],").unwrap();
        offset += gap;
    }
    def += "}\n";
    writeln!(
        def,
        "// SAFETY: the fields' offsets, in order (asserted below).\n\
         unsafe impl crate::cuda::KernelArgs for {name} {{\n    \
         const OFFSETS: &'static [usize] = &[{}];\n}}",
        offsets.join(", ")
    )
    .unwrap();
    writeln!(
        rust_checks,
        "const _: () = assert!(std::mem::size_of::<{name}>() == {offset});"
    )
    .unwrap();
    writeln!(
        c_checks,
        "static_assert(sizeof({name}) == {offset}, \"{name}: Rust's is {offset} bytes\");"
    )
    .unwrap();
    Ok((def + &rust_checks + "\n", c_checks))
}

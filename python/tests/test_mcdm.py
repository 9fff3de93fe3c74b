"""The Python package against independent references (the committed fixtures, made by
guided-diffusion, diffusers and sentence-transformers), against the CLI (the same images), its
errors, and that it releases the GIL. Run by scripts/python-test.sh."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mcdm

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
UNCOND = ROOT / "weights" / "uncond.safetensors"


def rel_l2(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_the_package_is_the_built_module():
    assert mcdm.__version__ == "0.1.0"
    # Installed, not imported from the checkout's python/ folder.
    assert Path(mcdm.__file__).resolve().parent != ROOT / "python" / "mcdm"


# f32 rel L2 against the reference implementation: mcdm's Rust tests measure at most 1.4e-6.
FORWARD_BOUND = 1e-5


@pytest.mark.parametrize(
    "folder, name",
    [
        ("unet", "attn_ds1_dropout"),  # guided-diffusion UNetModel
        ("unet", "classcond_sigma_headsup_bf16"),  # class labels, bf16 weights
        ("unet", "embed24_in6_3level"),  # a vector condition, image channels
        ("diffusers", "attn_scale_shift_classes"),  # a diffusers UNet2DModel folder
        ("diffusers", "groups_4"),
    ],
)
def test_forward_matches_the_reference_implementation(folder, name):
    if folder == "unet":
        path, io = FIXTURES / "unet" / f"{name}.safetensors", FIXTURES / "unet" / f"{name}.io.safetensors"
    else:
        path, io = FIXTURES / "diffusers" / name, FIXTURES / "diffusers" / name / "io.safetensors"
    io = load_file(str(io))
    model = mcdm.load_model(path, device="cpu")
    assert model.device == "cpu" and model.dtype == "f32" and model.parameters > 0
    out = model.forward(io["x"], io["t"], y=io.get("y"), emb=io.get("emb"))
    assert out.dtype == np.float32 and out.shape == io["out"].shape
    assert rel_l2(out, io["out"]) <= FORWARD_BOUND


def test_forward_takes_array_likes_and_any_layout():
    model = mcdm.load_model(UNCOND, device="cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 32, 32))  # float64, converted
    want = model.forward(x.astype(np.float32), np.array([3.0, 700.0], np.float32))
    # A transposed view (not C-contiguous) and a list of ints give the same numbers.
    x_f = np.asfortranarray(x)
    assert np.array_equal(model.forward(x_f, [3, 700]), want)
    assert model.config["image_size"] == 32
    assert "uncond.safetensors" in repr(model)


def test_encode_text_matches_sentence_transformers():
    sentences = json.loads((FIXTURES / "text" / "sentences.json").read_text())["sentences"]
    want = load_file(str(FIXTURES / "text" / "embeddings.safetensors"))["embedding"]
    got = mcdm.encode_text([s["text"] for s in sentences])
    assert got.shape == want.shape == (len(sentences), 384)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= 1e-4


def cli_samples(tmp_path, *args):
    out = tmp_path / "cli"
    tensor = tmp_path / "cli.safetensors"
    run = subprocess.run(
        [os.environ.get("MCDM_BIN", "mcdm"), "sample", "--device", "cpu", "--out", str(out),
         "--save-tensor", str(tensor), *args],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return load_file(str(tensor))["samples"]


def test_the_default_job_gives_the_cli_images(tmp_path):
    # The default job (the SynthFaces experts on held-back conditions), fewer steps and images.
    want = cli_samples(tmp_path, "--num-samples", "3", "--steps", "6")
    got = mcdm.sample(num_samples=3, steps=6, device="cpu")
    assert got.dtype == np.float32 and got.shape == (3, 3, 32, 32)
    assert np.array_equal(got, want)
    # The job given explicitly, as an object or a path, is the same run.
    job = mcdm.load_job(ROOT / "examples" / "default.json")
    assert job.settings["sampler"] == "ddpm" and ("uncond", ) == tuple(n for n, _ in job.models if n == "uncond")
    assert np.array_equal(mcdm.sample(job=job, num_samples=3, steps=6, device="cpu"), want)
    assert np.array_equal(mcdm.sample(job=str(job.path), num_samples=3, steps=6, device="cpu"), want)


def test_terms_and_overrides_follow_the_cli(tmp_path):
    text = "a smiling woman with long red hair and glasses"
    want = cli_samples(
        tmp_path, "--model", f"u={UNCOND}", "--uncond", "u", "--expert",
        f"text,weight=1.5,text={text}", "--sampler", "dpmpp-2m", "--steps", "5",
        "--num-samples", "2", "--seed", "7", "--batch-size", "1",
    )
    common = dict(sampler="dpmpp-2m", steps=5, num_samples=2, seed=7, device="cpu")
    # A dict term and a spec string: the CLI's images, bit for bit.
    got = mcdm.sample(models={"u": UNCOND}, uncond="u", batch_size=1,
                      experts=[{"model": "text", "weight": 1.5, "text": text}], **common)
    assert np.array_equal(got, want)
    got = mcdm.sample(models={"u": str(UNCOND)}, uncond={"model": "u"}, batch_size=1,
                      experts=[f"text,weight=1.5,text={text}"], **common)
    assert np.array_equal(got, want)
    # Another batch size: each image keeps its own noise; the CPU's sums may round otherwise.
    got = mcdm.sample(models={"u": UNCOND}, uncond="u", batch_size=2,
                      experts=[f"text,weight=1.5,text={text}"], **common)
    assert rel_l2(got, want) <= 1e-5


def test_init_noise_and_progress():
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    calls = []
    a = mcdm.sample(models={"u": UNCOND}, uncond="u", sampler="ddim", steps=4, num_samples=2,
                    batch_size=1, init_noise=noise, device="cpu",
                    progress=lambda *p: calls.append(p))
    # (first image, batch, steps done, steps): every step of both batches.
    assert calls == [(f, 1, s, 4) for f in (0, 1) for s in range(1, 5)]
    b = mcdm.sample(models={"u": UNCOND}, uncond="u", sampler="ddim", steps=4, num_samples=2,
                    batch_size=1, init_noise=noise.astype(np.float64), device="cpu")
    assert np.array_equal(a, b)
    c = mcdm.sample(models={"u": UNCOND}, uncond="u", sampler="ddim", steps=4, num_samples=2,
                    device="cpu")
    assert not np.array_equal(a, c), "the given noise was ignored"


def test_init_noise_from_a_file(tmp_path):
    from safetensors.numpy import save_file

    noise = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "noise.safetensors"
    save_file({"x_T": noise}, str(path))
    assert np.array_equal(sample_u(init_noise=path), sample_u(init_noise=noise))
    # Values far past standard normal noise are said to be.
    save_file({"x_T": noise * 150}, str(path))
    with pytest.warns(UserWarning, match="far past standard normal noise"):
        sample_u(init_noise=path)


def test_save_grid(tmp_path):
    images = np.linspace(-1, 1, 5 * 3 * 8 * 8, dtype=np.float32).reshape(5, 3, 8, 8)
    path = tmp_path / "grid.png"
    mcdm.save_grid(images, path, columns=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"images must be \[N, 3, H, W\]"):
        mcdm.save_grid(images[:, :2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    code = block.replace('"grid.png"', repr(str(tmp_path / "grid.png")))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["images"].shape == (8, 3, 32, 32)
    assert scope["eps"].shape == (2, 3, 32, 32) and scope["emb"].shape == (1, 384)
    assert (tmp_path / "grid.png").is_file()


def test_the_example_script_runs(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python" / "compose.py"), "--steps", "2",
         "--num-samples", "2", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    for grid in ["default.png", "text-not-sketch.png", "shared-noise.png"]:
        assert (tmp_path / grid).read_bytes()[:4] == b"\x89PNG"


def sample_u(**kw):
    args = dict(models={"u": UNCOND}, uncond="u", steps=3, num_samples=1, device="cpu")
    args.update(kw)
    return mcdm.sample(**args)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: mcdm.load_model("/no/such/model.safetensors"), FileNotFoundError, "model.safetensors"),
        (lambda: mcdm.load_model(FIXTURES / "text" / "sentences.json"), ValueError, "sentences.json"),
        (lambda: mcdm.load_model(UNCOND, device="tpu"), ValueError, "expected cpu, cuda, cuda:N or auto"),
        (lambda: mcdm.load_model(UNCOND, dtype="f8"), ValueError, "expected bf16, f16 or f32"),
        (lambda: mcdm.load_job(FIXTURES / "text" / "embeddings.safetensors"), ValueError, "job file"),
        (lambda: sample_u(sampler="euler"), ValueError, "dpmpp-2m"),
        (lambda: sample_u(uncond="nobody"), ValueError, "unknown model `nobody`"),
        (lambda: sample_u(experts=[{"model": "u", "colour": "red"}]), ValueError, "unknown key `colour`"),
        (lambda: sample_u(experts=["u,weight=abc"]), ValueError, "weight must be a number"),
        (lambda: sample_u(experts=[]), ValueError, "an empty list composes nothing"),
        (lambda: sample_u(sampler="ddpm", eta=0.5), ValueError, "DDIM setting"),
        (lambda: sample_u(sampler="ddim", karras=True), ValueError, "karras chooses a solver's sigmas"),
        (lambda: sample_u(eta=1.5), ValueError, "eta must be between 0 (deterministic) and 1, got 1.5"),
        (lambda: sample_u(steps=0), ValueError, "steps, num_samples and batch_size must be positive"),
        (lambda: sample_u(num_samples=0), ValueError, "must be positive"),
        (lambda: sample_u(init_noise=np.zeros((2, 3, 32, 32))), ValueError, "expected [1, 3, 32, 32]"),
        (lambda: sample_u(init_noise="/no/such/noise.safetensors"), FileNotFoundError, "noise.safetensors"),
        (lambda: sample_u(models={"u": "/no/such/u.safetensors"}), ValueError, "loading model `u`"),
        (lambda: sample_u(init_noise=np.full((1, 3, 32, 32), np.nan)), ValueError, "3072 non-finite"),
    ],
)
def test_errors_name_the_problem(call, error, message):
    with pytest.raises(error) as e:
        call()
    assert message in str(e.value)


def test_a_jobs_own_conflicts_name_the_job(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"models": {"u": str(UNCOND)}, "uncond": {"model": "u"},
                               "sampler": "ddpm", "eta": 0.3, "steps": 3, "num_samples": 1}))
    with pytest.raises(ValueError, match="job file: `eta` 0.3 is a DDIM setting"):
        mcdm.sample(job=job, device="cpu")
    # A sampler given over the job drops its DDIM eta, as --sampler does.
    assert mcdm.sample(job=job, sampler="ddim", device="cpu").shape == (1, 3, 32, 32)


def test_forward_errors():
    model = mcdm.load_model(UNCOND, device="cpu")
    x = np.ones((2, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        model.forward(x[0], [1, 2])
    with pytest.raises(ValueError, match="t has 1 values for 2 images"):
        model.forward(x, [1])
    with pytest.raises(ValueError, match="channels"):
        model.forward(np.ones((2, 4, 32, 32), np.float32), [1, 2])
    x[1, 2, 3, 4] = np.inf
    with pytest.raises(ValueError, match="x holds 1 non-finite"):
        model.forward(x, [1, 2])
    with pytest.raises(ValueError, match="timestep NaN is not finite"):
        model.forward(np.ones((2, 3, 32, 32)), [1, np.nan])


@pytest.mark.skipif("MCDM_FAKE_GPU_ENV" not in os.environ,
                    reason="tests/fake_gpu.rs runs it with the fake CUDA driver")
def test_out_of_device_memory_is_a_memory_error():
    # In a process of its own: the fake libcuda (a CPU emulation of the GPU) must be found when
    # the process starts, and it has 64 MiB of device memory here.
    env = {**os.environ, **json.loads(os.environ["MCDM_FAKE_GPU_ENV"]),
           "FAKE_CUDA_MEMORY_BYTES": str(64 << 20)}
    code = f"""
import mcdm, numpy as np
model = mcdm.load_model({str(UNCOND)!r}, device="cuda", dtype="f32")
assert model.device.startswith("cuda:0"), model.device
try:
    model.forward(np.ones((256, 3, 32, 32), np.float32), np.full(256, 3.0))
except MemoryError as e:
    print("MemoryError:", e)
"""
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "MemoryError: CUDA: allocating" in run.stdout and "out of device memory" in run.stdout


def test_a_progress_callback_that_raises_stops_the_run():
    def stop(first, batch, step, steps):
        if step == 2:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        sample_u(steps=10, progress=stop)


def test_ctrl_c_stops_between_steps():
    # SIGINT from another thread while the main thread samples: Python's handler runs when the
    # engine next takes the GIL, between two steps.
    steps = []
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sample_u(steps=1000, num_samples=2, progress=lambda *p: steps.append(p))
    finally:
        timer.cancel()
    assert 0 < len(steps) < 1000


def longest_pause_of_another_thread(work):
    """Runs `work` while a second thread ticks; the run's duration and the longest time the
    ticking thread did not run (the whole run if `work` held the GIL)."""
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.01)
        start = time.monotonic()
        work()
        end = time.monotonic()
    finally:
        stop.set()
        thread.join()
    during = [t for t in ticks if start <= t <= end]
    return end - start, float(np.diff([start, *during, end]).max())


def test_forward_and_sampling_release_the_gil():
    model = mcdm.load_model(UNCOND, device="cpu")
    x = np.random.default_rng(2).standard_normal((48, 3, 32, 32)).astype(np.float32)
    took, pause = longest_pause_of_another_thread(lambda: model.forward(x, np.full(48, 500.0)))
    assert took > 0.05 and pause < took / 4, (took, pause)
    # Four steps: holding the GIL through a step would pause the other thread for a quarter.
    took, pause = longest_pause_of_another_thread(
        lambda: sample_u(steps=4, num_samples=48, sampler="ddim"))
    assert took > 0.2 and pause < took / 16, (took, pause)

//! Sharded runs: each shard (from --shard or a scheduler's environment) makes its images
//! exactly as the whole run does, and `mcdm merge` joins shards of one job into the folder one
//! process writes, byte for byte, refusing shards that do not fit together.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixtures;

/// The environment variables a scheduler sets, none of them inherited from the test's own.
const SHARD_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "JOB_COMPLETION_INDEX",
];

fn mcdm(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
    for var in SHARD_VARS {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(env.iter().copied());
    let out = common::output(&mut cmd);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mcdm sample` of the fixture model, `n` images, into `out`, plus `extra`.
fn sample(out: &Path, n: &str, extra: &[&str], env: &[(&str, &str)]) -> String {
    let model = format!(
        "u={}",
        fixtures("sample/models/uncond.safetensors").display()
    );
    let out = out.display().to_string();
    let mut args = vec![
        "sample",
        "--device",
        "cpu",
        "--model",
        &model,
        "--uncond",
        "u",
        "--steps",
        "2",
        "--num-samples",
        n,
        "--png-scale",
        "2",
        "--seed",
        "3",
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    let (code, err) = mcdm(&args, env);
    assert_eq!(code, Some(0), "{args:?} {env:?}: {err}");
    err
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("record.json")).unwrap()).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn shards_from_every_source_merge_into_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let whole_npz = dir.path().join("whole.npz");
    sample(
        &whole,
        "7",
        &["--npz", &whole_npz.display().to_string()],
        &[],
    );
    let parts = dir.path().join("parts");
    // Four shards, each told its place another way: the flag, torchrun, srun, a Slurm array.
    let said = [
        sample(&parts, "7", &["--shard", "0/4"], &[]),
        sample(&parts, "7", &[], &[("RANK", "1"), ("WORLD_SIZE", "4")]),
        sample(
            &parts,
            "7",
            &[],
            &[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4")],
        ),
        sample(
            &parts,
            "7",
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", "13"),
                ("SLURM_ARRAY_TASK_MIN", "10"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
        ),
    ];
    assert!(
        said[1].contains("shard 1 of 4 (from RANK/WORLD_SIZE): images 1..3 of 7"),
        "{}",
        said[1]
    );
    let shard = |i: usize| parts.join(format!("shard-{i}-of-4"));
    assert_eq!(
        files(&shard(3)),
        ["000005.png", "000006.png", "grid.png", "record.json"]
    );
    assert_eq!(
        record(&shard(2))["shard"]["from"],
        "SLURM_PROCID/SLURM_NTASKS"
    );
    // A Kubernetes Indexed Job gives the index, --num-shards the count.
    let k8s = dir.path().join("k8s");
    sample(
        &k8s,
        "7",
        &["--num-shards", "4"],
        &[("JOB_COMPLETION_INDEX", "3")],
    );
    assert_eq!(files(&k8s.join("shard-3-of-4")), files(&shard(3)));

    let merged = dir.path().join("merged");
    let npz = dir.path().join("merged.npz");
    let shards: Vec<String> = (0..4).map(|i| shard(i).display().to_string()).collect();
    let mut args = vec!["merge"];
    args.extend(shards.iter().rev().map(String::as_str));
    let (out, npz_s) = (merged.display().to_string(), npz.display().to_string());
    args.extend(["--out", &out, "--npz", &npz_s]);
    let (code, err) = mcdm(&args, &[]);
    assert_eq!(code, Some(0), "{err}");
    // Every image and the grid, byte for byte.
    assert_eq!(files(&merged), files(&whole));
    for name in files(&whole).iter().filter(|n| n.ends_with(".png")) {
        assert_eq!(
            std::fs::read(merged.join(name)).unwrap(),
            std::fs::read(whole.join(name)).unwrap(),
            "{name}"
        );
    }
    // One record of the job, as the whole run's but for what describes the processes.
    let (mut a, b) = (record(&merged), record(&whole));
    assert_eq!(a["merged_from"].as_array().unwrap().len(), 4);
    for key in ["command", "seconds", "merged_from", "batch_size"] {
        a.as_object_mut().unwrap().remove(key);
    }
    let mut b = b;
    for key in ["command", "seconds", "batch_size"] {
        b.as_object_mut().unwrap().remove(key);
    }
    assert_eq!(a, b);
    // The .npz guided-diffusion's evaluation reads: arr_0 uint8 [7, 16, 16, 3], the images at
    // their sampled size.
    let npy_of = |path: &Path| {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let mut npy = Vec::new();
        std::io::Read::read_to_end(&mut zip.by_name("arr_0.npy").unwrap(), &mut npy).unwrap();
        npy
    };
    let npy = npy_of(&npz);
    // `mcdm sample --npz` of the whole run holds the same array.
    assert_eq!(npy_of(&whole_npz), npy);
    let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let header = std::str::from_utf8(&npy[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'descr': '|u1'") && header.contains("'shape': (7, 16, 16, 3)"),
        "{header}"
    );
    assert_eq!((10 + header_len) % 64, 0);
    let pixels = &npy[10 + header_len..];
    assert_eq!(pixels.len(), 7 * 16 * 16 * 3);
    // Image 4's pixel (5, 6) is the 2x2 block at (10, 12) of its PNG.
    let png = mcdm::image::read_png(&whole.join("000004.png")).unwrap();
    let at = |c: usize| ((png.data[c * 32 * 32 + 10 * 32 + 12] + 1.0) * 127.5).round() as u8;
    assert_eq!(
        &pixels[(4 * 256 + 5 * 16 + 6) * 3..][..3],
        &[at(0), at(1), at(2)]
    );
}

#[test]
fn shards_that_do_not_fit_together_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let parts = dir.path().join("parts");
    for i in 0..3 {
        sample(&parts, "5", &["--shard", &format!("{i}/3")], &[]);
    }
    let other = dir.path().join("other");
    sample(&other, "5", &["--shard", "1/3", "--sampler", "ddpm"], &[]);
    let shard = |i: usize| parts.join(format!("shard-{i}-of-3")).display().to_string();
    let out = dir.path().join("merged").display().to_string();
    let fails = |shards: &[&str], needle: &str| {
        let mut args = vec!["merge"];
        args.extend_from_slice(shards);
        args.extend(["--out", &out]);
        let (code, err) = mcdm(&args, &[]);
        assert_eq!(code, Some(1), "{shards:?}: {err}");
        assert!(err.contains(needle), "{shards:?}: `{needle}` not in {err}");
        assert!(!Path::new(&out).join("record.json").exists());
    };
    let (s0, s1, s2) = (shard(0), shard(1), shard(2));
    fails(
        &[&s0, &s2],
        "no shard holds images 1..3: give the shard that made them",
    );
    fails(&[&s0, &s1], "no shard holds images 3..5 (the run has 5)");
    fails(&[&s0, &s1, &s1, &s2], "which an earlier shard holds too");
    let o = other.join("shard-1-of-3").display().to_string();
    fails(
        &[&s0, &o, &s2],
        "are not shards of one job: their records differ in `sampler`",
    );
    // A shard that was stopped is named, not merged.
    let mut partial = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(Path::new(&s2).join("record.json")).unwrap(),
    )
    .unwrap();
    partial["status"] = "partial".into();
    std::fs::write(Path::new(&s2).join("record.json"), partial.to_string()).unwrap();
    fails(&[&s0, &s1, &s2], "its run is partial");

    // More shards than images: the empty ones have nothing to do, and say so.
    let err = sample(&dir.path().join("few"), "2", &["--shard", "0/4"], &[]);
    assert!(err.contains("this shard has no image to make"), "{err}");
    assert!(!dir.path().join("few").exists());
    let (code, err) = mcdm(&["sample", "--shard", "4/4"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--shard: shard 4 of 4 does not exist"),
        "{err}"
    );
    let (code, err) = mcdm(
        &["sample", "--npz", "x.npz"],
        &[("RANK", "0"), ("WORLD_SIZE", "2")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`mcdm merge --npz` writes the whole run's"),
        "{err}"
    );
}

//! `mcdm bench` on the CPU: its table and its JSON record agree with each other and with the
//! times measured (median of the sorted runs), for forward passes and composed sampling.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// A class-conditional model with an image condition (4 input channels), small enough that a
/// benchmark takes a fraction of a second.
const TINY: &str = r#"{"image_size": 8, "num_channels": 32, "num_res_blocks": 1,
    "channel_mult": "1", "attention_resolutions": "4", "num_head_channels": 32,
    "class_cond": true, "in_channels": 4}"#;
/// The same without conditions.
const PLAIN: &str = r#"{"image_size": 8, "num_channels": 32, "num_res_blocks": 1,
    "channel_mult": "1", "attention_resolutions": "4", "num_head_channels": 32}"#;

fn write_config(dir: &Path, json: &str) -> String {
    let config = dir.join("config.json");
    std::fs::write(&config, json).unwrap();
    config.display().to_string()
}

/// `bench_with` the TINY config.
fn bench(args: &[&str]) -> (String, String, Value) {
    bench_with(TINY, args)
}

/// Runs `mcdm bench --device cpu --config CONFIG ARGS --output record.json`: stdout, stderr
/// and the record.
fn bench_with(config: &str, args: &[&str]) -> (String, String, Value) {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.json");
    let config = write_config(dir.path(), config);
    let out = common::output(
        Command::new(env!("CARGO_BIN_EXE_mcdm"))
            .args(["bench", "--device", "cpu", "--config", &config])
            .args(args)
            .arg("--output")
            .arg(&record),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    let record = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    (stdout, stderr, record)
}

/// The arguments of the smallest composed run, of `experts` experts: 1 image, 2 steps, once.
fn one_composed_run(experts: &str) -> [&str; 8] {
    [
        "--compose",
        experts,
        "--steps",
        "2",
        "--batch",
        "1",
        "--iters",
        "1",
    ]
}

/// The sorted times of a result row, checked to be `iters` of them, and their median.
fn times_and_median(row: &Value, iters: usize) -> (Vec<f64>, f64) {
    let times: Vec<f64> = row["times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), iters, "{row}");
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]) && times[0] > 0.0,
        "{row}"
    );
    let median = times[iters / 2];
    (times, median)
}

#[test]
fn forward_benchmark_on_the_cpu() {
    let (stdout, stderr, record) = bench(&["--batch", "1,3", "--iters", "3"]);
    assert!(
        record["tool"].as_str().unwrap().starts_with("mcdm "),
        "{record}"
    );
    assert!(
        record["device"].as_str().unwrap().starts_with("cpu, "),
        "{record}"
    );
    assert_eq!(record["compose_experts"], 0, "{record}");
    assert_eq!(record["config"]["in_channels"], 4, "{record}");
    // The kernel and fusion switches as the run saw them (it inherits this process's).
    for switch in [
        "MCDM_CONV_KERNEL",
        "MCDM_FOLD_COPIES",
        "MCDM_NORM_STATS_IN_CONV",
        "MCDM_NORM_APPLY_IN_CONV",
    ] {
        let seen = record["environment"][switch].as_str().map(str::to_owned);
        assert_eq!(seen, std::env::var(switch).ok(), "{record}");
        assert!(record["environment"].get(switch).is_some(), "{record}");
    }
    let gflop = record["gflop_per_image"].as_f64().unwrap();
    assert!(
        stderr.contains(&format!("{gflop:.2} GFLOP per image at 8x8), cpu, ")),
        "{stderr}"
    );
    let rows = record["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{record}");
    for (row, n) in rows.iter().zip([1usize, 3]) {
        assert_eq!(row["batch"], n, "{row}");
        let (_, median) = times_and_median(row, 3);
        assert_eq!(row["seconds_per_forward"].as_f64().unwrap(), median);
        let per_second = row["images_per_second"].as_f64().unwrap();
        assert!(
            (per_second - n as f64 / median).abs() <= 1e-9 * per_second,
            "{row}"
        );
        let line = format!(
            "| {n} | {median:.4} | {:.2} | {:.2} | {:.1} |",
            median * 1e3 / n as f64,
            n as f64 / median,
            gflop * n as f64 / median
        );
        assert!(
            stdout.lines().any(|l| l == line),
            "no `{line}` in:\n{stdout}"
        );
    }
}

#[test]
fn composed_benchmark_on_the_cpu() {
    let args = [
        "--compose",
        "2",
        "--steps",
        "3",
        "--batch",
        "2",
        "--iters",
        "2",
    ];
    let (stdout, stderr, record) = bench(&args);
    assert_eq!(
        (record["compose_experts"].as_u64(), record["steps"].as_u64()),
        (Some(2), Some(3))
    );
    assert!(
        stderr.contains("composed DDIM: 2 expert(s) + unconditional, 3 steps"),
        "{stderr}"
    );
    // The composed run counts the model's work as the forward benchmark does.
    let gflop = record["gflop_per_image"].as_f64().unwrap();
    let (_, _, forward) = bench(&["--batch", "1", "--iters", "1"]);
    assert_eq!(forward["gflop_per_image"].as_f64(), Some(gflop));
    assert!(
        gflop > 1e-3 && gflop < 1.0,
        "{gflop} GFLOP for an 8x8 model of 32 channels"
    );
    let row = &record["results"][0];
    assert_eq!(
        (row["batch"].as_u64(), row["batch_ran"].as_u64()),
        (Some(2), Some(2)),
        "{row}"
    );
    let (_, median) = times_and_median(row, 2);
    assert_eq!(row["seconds_per_run"].as_f64().unwrap(), median);
    // Every step runs the 2 experts and the unconditional model on both images.
    let forwards = 3.0 * 3.0 * 2.0;
    let line = format!(
        "| 2 | {median:.4} | {:.2} | {:.1} | n/a |",
        2.0 / median,
        gflop * forwards / median
    );
    assert!(
        stdout.lines().any(|l| l == line),
        "no `{line}` in:\n{stdout}"
    );
    // A model without conditions composes too: none is given to it.
    bench_with(PLAIN, &one_composed_run("1"));
}

/// The bounds on a benchmark's size hold at their limits: up to them runs, past them is refused
/// (the step count matters to composed runs only, so 10000 costs nothing in a forward one).
#[test]
fn benchmark_bounds() {
    bench(&["--batch", "1", "--iters", "1", "--steps", "10000"]);
    bench(&one_composed_run("64"));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY);
    for (args, needle) in [
        (
            &["--iters", "0"][..],
            "--iters and every --batch must be positive",
        ),
        (
            &["--batch", "2,0"],
            "--iters and every --batch must be positive",
        ),
        (
            &["--batch", "4097"],
            "--batch 4097: a benchmark batch is at most 4096 images",
        ),
        (&["--compose", "65"], "--compose 65: at most 64 experts"),
        (&["--steps", "10001"], "--steps 10001: at most 10000"),
        (
            &["--profile"],
            "--profile times the kernels of a forward pass",
        ),
    ] {
        let out = common::output(
            Command::new(env!("CARGO_BIN_EXE_mcdm"))
                .args(["bench", "--device", "cpu", "--config", &config])
                .args(args),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

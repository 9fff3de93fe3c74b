//! `mcdm info`: runs where there is no GPU, lists ptxas's report on every kernel when the build
//! has kernel images, and ends quietly when its reader goes away. Like every command, it warns
//! of an unknown `MCDM_CONV_KERNEL`.

mod common;

use std::process::{Command, Stdio};

#[test]
fn info_lists_every_kernel_with_its_registers() {
    let out = common::output(Command::new(env!("CARGO_BIN_EXE_mcdm")).args([
        "info",
        "--kernels",
        "--arch",
        "sm_80",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("built without NVRTC") {
        common::skip(
            "the kernel list",
            "this build has no kernel images (no NVRTC)",
        );
        return;
    }
    // The summary line agrees with the table below it.
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 6 && w[0].ends_with(".cu"))
        .collect();
    // Each kernel once: the rows are this architecture's alone.
    let names: std::collections::HashSet<&str> = rows.iter().map(|row| row[1]).collect();
    assert_eq!(names.len(), rows.len(), "{text}");
    let registers = |row: &Vec<&str>| row[2].parse::<u32>().unwrap();
    let most = rows.iter().map(registers).max().unwrap();
    let spilling = rows.iter().filter(|row| row[5] != "0/0").count();
    let summary = text
        .lines()
        .find(|l| l.starts_with("ptxas (sm_80): "))
        .unwrap_or_else(|| panic!("no summary:\n{text}"));
    let spills = match spilling {
        0 => "no register spills".to_string(),
        n => format!("{n} kernels spill registers"),
    };
    let head = format!(
        "ptxas (sm_80): {} kernels, at most {most} registers a thread (",
        rows.len()
    );
    assert!(
        summary.starts_with(&head) && summary.ends_with(&format!("), {spills}")),
        "{summary}"
    );
    let named = summary[head.len()..].split(')').next().unwrap();
    assert!(
        rows.iter()
            .any(|row| row[1] == named && registers(row) == most),
        "{summary}"
    );
    // One kernel of each family, each with a register count.
    for (file, kernel) in [
        ("conv.cu", "conv2d_m128n128_bf16"),
        ("attention.cu", "attention_f16"),
        ("group_norm.cu", "group_norm_partial_f32"),
        ("step.cu", "diffusion_step"),
    ] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([file, kernel]))
            .unwrap_or_else(|| panic!("{kernel} missing:\n{text}"));
        let registers: u32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(registers > 0, "{line}");
    }
}

#[test]
fn a_closed_pipe_ends_info_without_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcdm"))
        .args(["info", "--kernels"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away (as with `| head -1`)
    let out = common::process::wait_within(child, common::process::LIMIT, "mcdm info --kernels");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `MCDM_CONV_KERNEL` takes the kernels' names or `auto`; anything else is reported, not fatal.
#[test]
fn conv_kernel_override_is_checked() {
    let info = |value: &str| {
        let out = common::output(
            Command::new(env!("CARGO_BIN_EXE_mcdm"))
                .arg("info")
                .env("MCDM_CONV_KERNEL", value),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{value}: {stderr}");
        stderr
    };
    for name in ["tile64", "tile128", "tile128x64", "tile256x128", "auto"] {
        let stderr = info(name);
        assert!(!stderr.contains("MCDM_CONV_KERNEL"), "{name}: {stderr}");
    }
    let stderr = info("tile99");
    assert!(
        stderr.contains(
            "warning: MCDM_CONV_KERNEL=tile99 is not tile64, tile128, tile128x64, tile256x128 or auto; ignored"
        ),
        "{stderr}"
    );
}

//! `mcdm merge`: the shards of one sharded `mcdm sample` run joined into one folder, as one
//! process would have written it (the same images and grid, one record), after checking that
//! they come from one job and cover every image exactly once.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use mcdm::files::{read_string_limited, write_atomic, JSON_LIMIT};
use mcdm::image::{downscale, grid, images_npz, read_rgb8, upscale};

use super::sample::folder::{image_name, RunFolder, GRID, RECORD};
use super::sample::output::{command_line, differing_keys, job_of};
use super::{check_output_file, same_file};

/// Join the shard folders of one sharded run (`mcdm sample --shard I/N`) into one.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    mcdm merge out/shard-*-of-4 --out out/all --npz out/all.npz\n\n\
The shards must be complete runs of one job (the same models by hash, conditions, sampler, \
seed and sizes) that together cover images 0..num_samples exactly once.")]
pub struct Args {
    /// The shard folders, each with its record.json.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// The folder to write: every image, the grid and one record.json.
    #[arg(long)]
    out: PathBuf,
    /// Also write the images as guided-diffusion's evaluation suite reads them: an .npz with
    /// `arr_0`, uint8 [N, H, W, 3].
    #[arg(long, value_name = "FILE")]
    npz: Option<PathBuf>,
}

struct Part {
    dir: PathBuf,
    record: Value,
    first: usize,
    images: usize,
}

fn read_part(dir: &Path) -> Result<Part> {
    let path = dir.join(RECORD);
    let text = read_string_limited(&path, JSON_LIMIT, "record")
        .with_context(|| format!("{}: not the folder of a run", dir.display()))?;
    let record: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let number = |key: &str| {
        record[key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("{}: no `{key}`", path.display()))
    };
    let (first, images) = (number("first_image")?, number("images")?);
    match record["status"].as_str() {
        Some("complete") => {}
        status => bail!(
            "{}: its run is {} ({images} image(s) from {first}): finish that shard first",
            dir.display(),
            status.unwrap_or("of unknown status")
        ),
    }
    Ok(Part {
        dir: dir.to_path_buf(),
        record,
        first,
        images,
    })
}

pub fn run(args: Args) -> Result<()> {
    let mut parts = args
        .shards
        .iter()
        .map(|d| read_part(d))
        .collect::<Result<Vec<_>>>()?;
    let job = job_of(&parts[0].record);
    for part in &parts[1..] {
        let other = job_of(&part.record);
        if other != job {
            let differs = differing_keys(&job, &other);
            bail!(
                "{} and {} are not shards of one job: their records differ in {}",
                parts[0].dir.display(),
                part.dir.display(),
                differs.join(", ")
            );
        }
    }
    let n = job["num_samples"]
        .as_u64()
        .context("the records give no `num_samples`")? as usize;
    // Every image exactly once.
    parts.sort_by_key(|p| p.first);
    let mut next = 0;
    for part in &parts {
        if part.first > next {
            bail!(
                "no shard holds images {next}..{}: give the shard that made them",
                part.first
            );
        }
        if part.first < next {
            bail!(
                "{} holds images {}..{}, which an earlier shard holds too (from {}): give each \
                 shard once",
                part.dir.display(),
                part.first,
                part.first + part.images,
                part.first
            );
        }
        next = part.first + part.images;
    }
    if next != n {
        bail!("no shard holds images {next}..{n} (the run has {n})");
    }

    if args.shards.iter().any(|d| same_file(d, &args.out)) {
        bail!(
            "--out {}: is one of the shards; choose another folder",
            args.out.display()
        );
    }
    if let Some(path) = &args.npz {
        check_output_file(path, "--npz", &[])?;
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output directory {}", args.out.display()))?;
    let folder = RunFolder::open(&args.out)?;
    let scale = job["png_scale"].as_u64().unwrap_or(1) as usize;
    let mut rgb = Vec::with_capacity(n);
    let mut size = [0, 0];
    for part in &parts {
        for k in part.first..part.first + part.images {
            let path = part.dir.join(image_name(k));
            let (pixels, h, w) = read_rgb8(&path)?;
            size = [h / scale, w / scale];
            rgb.push(downscale(&pixels, h, w, scale));
            folder.stage_file(k, &path)?;
        }
    }
    let [h, w] = size;
    let (g, gh, gw) = grid(&rgb, h, w, (n as f64).sqrt().ceil() as usize);
    folder.stage_grid(&upscale(&g, gh, gw, scale), scale * gh, scale * gw)?;
    if let Some(path) = &args.npz {
        write_atomic(path, &images_npz(&rgb.concat(), [n, h, w, 3])?)?;
    }
    // The first shard's record (its device, its text model) for the whole.
    let mut record = parts[0].record.clone();
    record["images"] = n.into();
    record["first_image"] = 0.into();
    record["shard"] = Value::Null;
    record["command"] = command_line().into();
    record["seconds"] = parts
        .iter()
        .filter_map(|p| p.record["seconds"].as_f64())
        .sum::<f64>()
        .into();
    record["merged_from"] = parts
        .iter()
        .map(|p| {
            std::path::absolute(&p.dir)
                .unwrap_or_else(|_| p.dir.clone())
                .display()
                .to_string()
        })
        .collect::<Vec<_>>()
        .into();
    folder.commit(0..n, &mut record, "complete")?;
    report!(
        "merged {} shard(s) into {} images: {}/{GRID}{}",
        parts.len(),
        n,
        args.out.display(),
        args.npz
            .as_ref()
            .map_or(String::new(), |p| format!(" and {}", p.display()))
    );
    Ok(())
}

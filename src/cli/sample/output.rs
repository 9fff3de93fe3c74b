//! What `mcdm sample` writes: one PNG per image, the grid, the optional tensor, and
//! `record.json` with everything to reproduce the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use mcdm::files::write_atomic;
use mcdm::image::{grid, to_rgb8, write_png};
use mcdm::job::TermSpec;
use mcdm::model::LoadedModel;
use mcdm::weights::{write_safetensors, TensorData};

use super::Plan;

/// A finished run, to write out.
pub(super) struct Outputs<'a> {
    pub plan: &'a Plan,
    pub init_noise: Option<&'a Path>,
    pub save_tensor: Option<&'a Path>,
    /// The models the run used: their names and paths, and the models loaded.
    pub models: &'a [(&'a (String, PathBuf), &'a LoadedModel)],
    pub respacing: &'a str,
    pub steps: usize,
    /// The batch size that ran.
    pub batch_used: usize,
    pub size: [usize; 2],
    pub device: String,
    pub seconds: f64,
}

impl Outputs<'_> {
    /// Writes the images, the grid, the tensor when asked for and the record, then says when
    /// the folder holds numbered images of an earlier, larger run.
    pub fn write(&self, samples: &[f32]) -> Result<()> {
        let plan = self.plan;
        let [h, w] = self.size;
        let n = plan.num_samples;
        let len = 3 * h * w;
        let mut rgb = Vec::with_capacity(n);
        for (k, img) in samples.chunks_exact(len).enumerate() {
            let pixels = to_rgb8(img, h, w);
            write_png(&plan.out.join(format!("{k:06}.png")), &pixels, h, w)?;
            rgb.push(pixels);
        }
        let (g, gh, gw) = grid(&rgb, h, w, (n as f64).sqrt().ceil() as usize);
        write_png(&plan.out.join("grid.png"), &g, gh, gw)?;
        if let Some(path) = self.save_tensor {
            write_safetensors(
                path,
                &[("samples", TensorData::F32(vec![n, 3, h, w], samples))],
                None,
            )
            .with_context(|| format!("--save-tensor {}", path.display()))?;
        }
        write_atomic(
            &plan.out.join("record.json"),
            serde_json::to_string_pretty(&self.record()?)?.as_bytes(),
        )?;
        let stale = earlier_images(&plan.out, n);
        if stale > 0 {
            eprintln!(
                "note: {} also holds {stale} numbered image(s) past {:06}.png from an earlier \
                 run, not part of this one",
                plan.out.display(),
                n - 1
            );
        }
        Ok(())
    }

    /// `record.json`: the models with their hashes and configs, the terms, the settings.
    fn record(&self) -> Result<serde_json::Value> {
        let plan = self.plan;
        let file =
            |p: &Path| json!({ "path": p.display().to_string(), "sha256": sha256_file(p).ok() });
        let term_json = |t: &TermSpec, weight: bool| {
            let mut v = json!({ "model": t.model });
            if let Some(c) = t.class {
                v["class"] = c.into();
            }
            if let Some(p) = &t.image {
                v["image"] = file(p);
            }
            if let Some(text) = &t.text {
                v["text"] = text.clone().into();
            }
            if let Some(p) = &t.embedding {
                v["embedding"] = file(p);
            }
            if weight {
                v["weight"] = decimal(t.weight);
            }
            v
        };
        let mut models = BTreeMap::new();
        for ((name, path), model) in self.models {
            models.insert(
                name.clone(),
                json!({
                    "path": path.display().to_string(),
                    "sha256": sha256_file(path)?,
                    "config": model.config.unet.to_json(&model.config.diffusion),
                }),
            );
        }
        Ok(json!({
            "mcdm_version": env!("CARGO_PKG_VERSION"),
            "formula": "eps = eps_u + sum_i w_i (eps_i - eps_u)",
            "models": models,
            "experts": plan.experts.iter().map(|t| term_json(t, true)).collect::<Vec<_>>(),
            "uncond": term_json(&plan.uncond, false),
            "sampler": plan.sampler.name(),
            "eta": decimal(plan.eta),
            "timestep_respacing": self.respacing,
            "steps": self.steps,
            "clip_denoised": plan.clip_denoised,
            "seed": plan.seed,
            "num_samples": plan.num_samples,
            "batch_size": self.batch_used,
            "image_size": self.size,
            "init_noise": self.init_noise.map(file),
            "device": self.device,
            "seconds": self.seconds,
        }))
    }
}

/// An f32 setting as it was written (0.7, not 0.699999988079071, its exact value as an f64).
fn decimal(v: f32) -> serde_json::Value {
    v.to_string()
        .parse::<f64>()
        .map_or(serde_json::Value::Null, Into::into)
}

/// k for an image file name `NNNNNN.png` (six digits).
pub(super) fn image_number(name: &str) -> Option<usize> {
    name.strip_suffix(".png")
        .filter(|stem| stem.len() == 6)
        .and_then(|stem| stem.parse().ok())
}

/// How many `NNNNNN.png` files in `dir` number `n` or more: images an earlier, larger run left.
fn earlier_images(dir: &Path, n: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| image_number(name).is_some_and(|k| k >= n))
        .count()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("hashing {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

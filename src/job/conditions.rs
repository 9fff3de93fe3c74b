//! Reading the conditions a term names: an image condition (a PNG, or safetensors `cond`) and
//! a vector condition (safetensors `embedding`, or a prompt already encoded). What is legal but
//! most likely a mistake (a huge weight or value, an empty prompt, a dropped alpha channel) is
//! returned as warnings for the caller to show.

use std::path::Path;

use super::TermSpec;
use crate::error::{Error, Result};
use crate::image::read_png;
use crate::sample::{Batched, Condition};
use crate::weights::SafetensorsFile;

/// Past this |weight| an expert swamps every other term: far past the guidance scales in use.
pub const WEIGHT_WARNING: f32 = 20.0;
/// Image conditions are images scaled to [-1, 1]: values past this are not one.
pub const IMAGE_VALUE_WARNING: f32 = 10.0;
/// Embeddings (unit-length sentence embeddings, learned vectors) are nowhere near this.
pub const EMBEDDING_VALUE_WARNING: f32 = 1e4;
/// Initial noise is standard normal: a million draws stay within 6.
pub const NOISE_VALUE_WARNING: f32 = 100.0;

/// The largest |value|, when it is past `bound`.
fn largest_past(values: &[f32], bound: f32) -> Option<f32> {
    let largest = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (largest > bound).then_some(largest)
}

/// A warning when initial noise read from `path` holds values far past standard normal ones.
pub fn init_noise_warning(path: &Path, values: &[f32]) -> Option<String> {
    largest_past(values, NOISE_VALUE_WARNING).map(|v| {
        format!(
            "initial noise {}: values reach {v:e}, far past standard normal noise (more than \
             {NOISE_VALUE_WARNING})",
            path.display()
        )
    })
}

/// `what: cause`, as the CLI shows an error with its context.
fn within(what: String) -> impl FnOnce(Error) -> Error {
    move |e| Error::Job(format!("{what}: {e}"))
}

/// Reads an image condition for `n` images: a PNG (scaled to [-1, 1]; gray gives 1 channel,
/// RGB 3), or safetensors `cond` `[C, H, W]` or `[1 or >= n, C, H, W]` (image k takes item k).
/// A PNG is converted to the `channels` the model takes where it is RGB for a 1-channel model
/// (Rec. 601 luma: 0.299 R + 0.587 G + 0.114 B) or gray for a 3-channel one (the gray copied to
/// each channel). Returns it with its `[C, H, W]`; a conversion or a PNG's dropped alpha
/// channel is added to `warnings`.
pub fn read_image_condition(
    path: &Path,
    n: usize,
    channels: usize,
    warnings: &mut Vec<String>,
) -> Result<(Batched, [usize; 3])> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        let png = read_png(path)?;
        if png.alpha_dropped {
            warnings.push(format!(
                "{}: the PNG's alpha channel is dropped (only its gray or RGB values are read)",
                path.display()
            ));
        }
        let hw = png.height * png.width;
        let (data, c) = match (png.channels, channels) {
            (3, 1) => {
                warnings.push(format!(
                    "{}: an RGB PNG for a 1-channel condition: converted to gray (0.299 R + \
                     0.587 G + 0.114 B)",
                    path.display()
                ));
                let (r, rest) = png.data.split_at(hw);
                let (g, b) = rest.split_at(hw);
                let gray = (0..hw)
                    .map(|p| 0.299 * r[p] + 0.587 * g[p] + 0.114 * b[p])
                    .collect();
                (gray, 1)
            }
            (1, 3) => {
                warnings.push(format!(
                    "{}: a gray PNG for a 3-channel condition: its gray is used for R, G and B",
                    path.display()
                ));
                (png.data.repeat(3), 3)
            }
            (c, _) => (png.data, c),
        };
        let data = Batched { data, count: 1 };
        return Ok((data, [c, png.height, png.width]));
    }
    let file = SafetensorsFile::open(path)?;
    let shape = file.shape("cond")?.to_vec();
    let (count, chw) = match shape[..] {
        [c, h, w] => (1, [c, h, w]),
        [k, c, h, w] if k == 1 || k >= n => (k, [c, h, w]),
        _ => {
            return Err(Error::Job(format!(
                "{}: `cond` must be [C, H, W] or [1 or at least {n}, C, H, W], got {shape:?}",
                path.display()
            )))
        }
    };
    Ok((
        Batched {
            data: file.f32("cond")?,
            count,
        },
        chw,
    ))
}

/// Reads a vector condition for `n` images: safetensors `embedding` `[D]` or `[1 or >= n, D]`.
pub fn read_embedding(path: &Path, n: usize) -> Result<Batched> {
    let file = SafetensorsFile::open(path)?;
    let shape = file.shape("embedding")?.to_vec();
    let count = match shape[..] {
        [_] => 1,
        [k, _] if k == 1 || k >= n => k,
        _ => {
            return Err(Error::Job(format!(
                "{}: `embedding` must be [D] or [1 or at least {n}, D], got {shape:?}",
                path.display()
            )))
        }
    };
    Ok(Batched {
        data: file.f32("embedding")?,
        count,
    })
}

/// The condition of `term` for `n` images of `size` (height, width) on a model taking
/// `embed_dim`-wide vector conditions and `image_channels`-channel images: its class, its
/// image condition read from its file, and its embedding read from its file or, for a `text=`
/// term, `prompt` (the text encoded). Adds to `warnings` what is legal but likely a mistake:
/// a |weight| past [`WEIGHT_WARNING`], an empty prompt, values far out of their usual range, a
/// dropped alpha channel, a 1-channel condition (a sketch) that is mostly light.
pub fn term_condition(
    term: &TermSpec,
    n: usize,
    [h, w]: [usize; 2],
    embed_dim: Option<usize>,
    image_channels: usize,
    prompt: Option<&[f32]>,
    warnings: &mut Vec<String>,
) -> Result<Condition> {
    let model = &term.model;
    if term.weight.abs() > WEIGHT_WARNING {
        warnings.push(format!(
            "expert `{model}` has weight {}: past ±{WEIGHT_WARNING} one expert swamps the \
             other terms",
            term.weight
        ));
    }
    if term.text.as_ref().is_some_and(|t| t.trim().is_empty()) {
        warnings.push(format!(
            "`{model}`: its text= prompt is empty: the embedding of no words conditions it"
        ));
    }
    let image = match &term.image {
        Some(p) => {
            let mut read = Vec::new();
            let (img, [_, ih, iw]) = read_image_condition(p, n, image_channels, &mut read)
                .map_err(within(format!("image condition of `{model}`")))?;
            warnings.extend(
                read.into_iter()
                    .map(|w| format!("image condition of `{model}`: {w}")),
            );
            if let Some(v) = largest_past(&img.data, IMAGE_VALUE_WARNING) {
                warnings.push(format!(
                    "image condition of `{model}` ({}): values reach {v:e}, far outside the \
                     [-1, 1] images are scaled to",
                    p.display()
                ));
            } else if image_channels == 1 && !img.data.is_empty() {
                // Sketches are sparse light lines on a dark ground: mostly light (three
                // quarters or more) is most likely dark lines drawn on white, which such an
                // expert reads as a scribble.
                let mean = img.data.iter().sum::<f32>() / img.data.len() as f32;
                if mean > 0.5 {
                    warnings.push(format!(
                        "image condition of `{model}` ({}): mostly light (mean {mean:.2} in [-1, \
                         1]): a sketch is light lines on a dark ground (line +1, none -1); dark \
                         lines drawn on white need inverting first",
                        p.display()
                    ));
                }
            }
            if (ih, iw) != (h, w) {
                return Err(Error::Job(format!(
                    "image condition {} of `{model}` is {ih}x{iw}, but the samples are {h}x{w}",
                    p.display()
                )));
            }
            Some(img)
        }
        None => None,
    };
    let embedding = match (&term.text, &term.embedding) {
        (Some(_), Some(_)) => {
            return Err(Error::Job(format!(
                "`{model}`: give text= or embedding=, not both"
            )))
        }
        (Some(_), None) => {
            let row = prompt.ok_or_else(|| {
                Error::Job(format!("`{model}`: its text= prompt was not encoded"))
            })?;
            if embed_dim != Some(row.len()) {
                return Err(Error::Job(format!(
                    "`{model}`: text= gives a {}-wide sentence embedding, but the model's \
                     embed_dim is {}",
                    row.len(),
                    embed_dim.map_or("none".to_string(), |d| d.to_string())
                )));
            }
            Some(Batched {
                data: row.to_vec(),
                count: 1,
            })
        }
        (None, Some(p)) => {
            let embedding = read_embedding(p, n).map_err(within(format!(
                "embedding of `{model}` from {}",
                p.display()
            )))?;
            if let Some(v) = largest_past(&embedding.data, EMBEDDING_VALUE_WARNING) {
                warnings.push(format!(
                    "embedding of `{model}` ({}): values reach {v:e}, an absurd magnitude for \
                     an embedding (more than {EMBEDDING_VALUE_WARNING:e})",
                    p.display()
                ));
            }
            Some(embedding)
        }
        (None, None) => None,
    };
    Ok(Condition {
        class: term.class,
        image,
        embedding,
    })
}

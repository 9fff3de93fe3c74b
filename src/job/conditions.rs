//! Reading the conditions a term names: an image condition (a PNG, or safetensors `cond`) and
//! a vector condition (safetensors `embedding`, or a prompt already encoded).

use std::path::Path;

use super::TermSpec;
use crate::error::{Error, Result};
use crate::image::read_png;
use crate::sample::{Batched, Condition};
use crate::weights::SafetensorsFile;

/// `what: cause`, as the CLI shows an error with its context.
fn within(what: String) -> impl FnOnce(Error) -> Error {
    move |e| Error::Job(format!("{what}: {e}"))
}

/// Reads an image condition for `n` images: a PNG (scaled to [-1, 1]; gray gives 1 channel,
/// RGB 3), or safetensors `cond` `[C, H, W]` or `[1 or >= n, C, H, W]` (image k takes item k).
/// Returns it with its `[C, H, W]`.
pub fn read_image_condition(path: &Path, n: usize) -> Result<(Batched, [usize; 3])> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        let (data, c, h, w) = read_png(path)?;
        return Ok((Batched { data, count: 1 }, [c, h, w]));
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
/// `embed_dim`-wide vector conditions: its class, its image condition read from its file, and
/// its embedding read from its file or, for a `text=` term, `prompt` (the text encoded).
pub fn term_condition(
    term: &TermSpec,
    n: usize,
    [h, w]: [usize; 2],
    embed_dim: Option<usize>,
    prompt: Option<&[f32]>,
) -> Result<Condition> {
    let model = &term.model;
    let image = match &term.image {
        Some(p) => {
            let (img, [_, ih, iw]) = read_image_condition(p, n)
                .map_err(within(format!("image condition of `{model}`")))?;
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
        (None, Some(p)) => Some(read_embedding(p, n).map_err(within(format!(
            "embedding of `{model}` from {}",
            p.display()
        )))?),
        (None, None) => None,
    };
    Ok(Condition {
        class: term.class,
        image,
        embedding,
    })
}

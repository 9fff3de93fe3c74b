//! PNG in and out: conditions read as [-1, 1] tensors, samples written as 8-bit RGB, grids.

use std::path::Path;

use crate::error::{Error, Result};
use crate::weights::write_atomic;

/// A PNG as a `[C, H, W]` tensor scaled to [-1, 1]: gray gives 1 channel, RGB 3; an alpha
/// channel is dropped. Returns (data, channels, height, width).
pub fn read_png(path: &Path) -> Result<(Vec<f32>, usize, usize, usize)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let bad = |e: String| Error::Input(format!("{}: not a readable PNG: {e}", path.display()));
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    // From the header, before decoding: a small file may declare a huge image.
    let (width, height) = (reader.info().width, reader.info().height);
    let max = crate::config::MAX_IMAGE_SIZE;
    if width as usize > max || height as usize > max {
        return Err(Error::Input(format!(
            "{}: the PNG is {width}x{height}, larger than mcdm's largest image size, {max}x{max}",
            path.display()
        )));
    }
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(e.to_string()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let (stride, channels) = match info.color_type {
        png::ColorType::Grayscale => (1, 1),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, 3),
        png::ColorType::Rgba => (4, 3),
        other => return Err(bad(format!("unsupported color type {other:?}"))),
    };
    let mut data = vec![0.0; channels * h * w];
    for p in 0..h * w {
        for c in 0..channels {
            data[c * h * w + p] = buf[p * stride + c] as f32 / 127.5 - 1.0;
        }
    }
    Ok((data, channels, h, w))
}

/// Quantises a `[3, H, W]` image in [-1, 1] to 8-bit RGB as the reference scripts do:
/// `((x + 1) * 127.5).clamp(0, 255)` truncated. Panics if `x` holds fewer than `3 h w` values.
pub fn to_rgb8(x: &[f32], h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; 3 * h * w];
    for p in 0..h * w {
        for c in 0..3 {
            out[p * 3 + c] = ((x[c * h * w + p] + 1.0) * 127.5).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Writes 8-bit RGB pixels as a PNG, atomically.
pub fn write_png(path: &Path, rgb: &[u8], h: usize, w: usize) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let side = |v: usize| {
            u32::try_from(v).map_err(|_| {
                Error::Input(format!(
                    "{}: a side of {v} pixels is more than a PNG holds",
                    path.display()
                ))
            })
        };
        let mut enc = png::Encoder::new(&mut bytes, side(w)?, side(h)?);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::Input(format!("{}: {e}", path.display()));
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(rgb).map_err(err)?;
    }
    write_atomic(path, &bytes)
}

/// Tiles RGB images (each `h x w`) into a grid with `cols` columns and a 2-pixel white gap.
/// Panics if an image holds fewer than `3 h w` bytes.
pub fn grid(images: &[Vec<u8>], h: usize, w: usize, cols: usize) -> (Vec<u8>, usize, usize) {
    const GAP: usize = 2;
    let cols = cols.clamp(1, images.len().max(1));
    let rows = images.len().div_ceil(cols);
    let (gh, gw) = (rows * h + (rows + 1) * GAP, cols * w + (cols + 1) * GAP);
    let mut out = vec![255u8; 3 * gh * gw];
    for (i, img) in images.iter().enumerate() {
        let (y0, x0) = (GAP + (i / cols) * (h + GAP), GAP + (i % cols) * (w + GAP));
        for y in 0..h {
            let dst = ((y0 + y) * gw + x0) * 3;
            out[dst..dst + 3 * w].copy_from_slice(&img[y * w * 3..][..3 * w]);
        }
    }
    (out, gh, gw)
}

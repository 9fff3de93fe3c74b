//! PNG in and out: conditions read as [-1, 1] tensors, samples written as 8-bit RGB, grids.

use std::path::Path;

use crate::error::{Error, Result};
use crate::files::{open_limited, write_atomic, PNG_LIMIT};

/// A PNG read as a tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Png {
    /// `[C, H, W]`, scaled to [-1, 1].
    pub data: Vec<f32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Whether the file had an alpha channel, which was dropped.
    pub alpha_dropped: bool,
}

/// A PNG as a `[C, H, W]` tensor scaled to [-1, 1]: gray gives 1 channel, RGB 3; an alpha
/// channel is dropped (and said so in [`Png::alpha_dropped`]). The file must be a regular file
/// within [`PNG_LIMIT`].
pub fn read_png(path: &Path) -> Result<Png> {
    let (file, _) = open_limited(path, PNG_LIMIT, "PNG file")?;
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
    Ok(Png {
        data,
        channels,
        height: h,
        width: w,
        alpha_dropped: stride > channels,
    })
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

/// The largest `--png-scale`: a 256x256 sample becomes 4096x4096.
pub const MAX_PNG_SCALE: usize = 16;

/// 8-bit RGB pixels (`h x w`) enlarged `scale` times by repeating each pixel (nearest
/// neighbour, so that every sample value stays visible as it is).
pub fn upscale(rgb: &[u8], h: usize, w: usize, scale: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rgb.len() * scale * scale);
    for row in rgb.chunks_exact(3 * w).take(h) {
        let wide: Vec<u8> = row
            .chunks_exact(3)
            .flat_map(|px| std::iter::repeat_n(px, scale).flatten().copied())
            .collect();
        for _ in 0..scale {
            out.extend_from_slice(&wide);
        }
    }
    out
}

/// A PNG of mcdm's (8-bit RGB, as [`write_png`] writes) as its pixels: (pixels, height,
/// width). Any other PNG is an error.
pub fn read_rgb8(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let (file, _) = open_limited(path, PNG_LIMIT, "PNG file")?;
    let bad = |e: String| Error::Input(format!("{}: not a readable PNG: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| bad(e.to_string()))?;
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut pixels)
        .map_err(|e| bad(e.to_string()))?;
    if (frame.color_type, frame.bit_depth) != (png::ColorType::Rgb, png::BitDepth::Eight) {
        return Err(bad("not 8-bit RGB, as mcdm writes its images".into()));
    }
    pixels.truncate(frame.buffer_size());
    Ok((pixels, frame.height as usize, frame.width as usize))
}

/// Every `scale`-th pixel of each row and column of `h x w` RGB pixels: an image before
/// [`upscale`].
pub fn downscale(rgb: &[u8], h: usize, w: usize, scale: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rgb.len() / (scale * scale));
    for y in (0..h).step_by(scale) {
        for x in (0..w).step_by(scale) {
            out.extend_from_slice(&rgb[(y * w + x) * 3..][..3]);
        }
    }
    out
}

/// 8-bit RGB images `[N, H, W, 3]` as the .npz guided-diffusion's evaluation suite reads: a zip
/// holding `arr_0.npy`, uint8 `shape`.
pub fn images_npz(pixels: &[u8], shape: [usize; 4]) -> Result<Vec<u8>> {
    let dims = shape.map(|d| d.to_string()).join(", ");
    let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6), version (2), header length (2), then the header padded to 64 bytes, in '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend_from_slice(pixels);
    let zip_err = |e: zip::result::ZipError| Error::Input(format!("writing the .npz: {e}"));
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(npy.len() as u64 >= u32::MAX as u64);
    zip.start_file("arr_0.npy", options).map_err(zip_err)?;
    std::io::Write::write_all(&mut zip, &npy)
        .map_err(|e| Error::Input(format!("writing the .npz: {e}")))?;
    Ok(zip.finish().map_err(zip_err)?.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;
    use png::{BitDepth, ColorType};

    /// Writes a PNG with the png crate directly, not through `write_png`.
    fn encode(path: &Path, color: ColorType, depth: BitDepth, size: (u32, u32), data: &[u8]) {
        let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        let mut enc = png::Encoder::new(file, size.0, size.1);
        enc.set_color(color);
        enc.set_depth(depth);
        if color == ColorType::Indexed {
            enc.set_palette(vec![10, 20, 30, 200, 150, 100]);
        }
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(data).unwrap();
    }

    #[test]
    fn upscale_repeats_each_pixel() {
        // 2x1 image: red, then a blue-green, scaled 3 times: a 6x3 image.
        let rgb = [200, 10, 20, 0, 90, 250];
        let big = upscale(&rgb, 1, 2, 3);
        assert_eq!(big.len(), 3 * 6 * 3);
        for y in 0..3 {
            for x in 0..6 {
                let px = &big[(y * 6 + x) * 3..][..3];
                assert_eq!(px, &rgb[(x / 3) * 3..][..3], "({y}, {x})");
            }
        }
        assert_eq!(upscale(&rgb, 1, 2, 1), rgb);
        assert_eq!(downscale(&big, 3, 6, 3), rgb);
    }

    /// `read_png` on every colour type: channel-first, `v / 127.5 - 1`, alpha dropped.
    #[test]
    fn pngs_are_read_channel_first_in_minus_one_to_one() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h) = (3usize, 2usize);
        let value = |p: usize, c: usize| (p * 40 + c * 7 + 3) as u8;
        let scaled = |v: u8| v as f32 / 127.5 - 1.0;
        let check = |name: &str, want_channels: usize, want: &dyn Fn(usize, usize) -> u8| {
            let png = read_png(&dir.path().join(name)).unwrap();
            let (got, c, gh, gw) = (png.data, png.channels, png.height, png.width);
            assert_eq!((c, gh, gw), (want_channels, h, w), "{name}");
            let alpha = name.starts_with("GrayscaleAlpha") || name.starts_with("Rgba");
            assert_eq!(png.alpha_dropped, alpha, "{name}");
            for ch in 0..c {
                for p in 0..h * w {
                    assert_eq!(got[ch * h * w + p], scaled(want(p, ch)), "{name} {ch} {p}");
                }
            }
        };
        for (color, samples, channels) in [
            (ColorType::Grayscale, 1, 1),
            (ColorType::GrayscaleAlpha, 2, 1),
            (ColorType::Rgb, 3, 3),
            (ColorType::Rgba, 4, 3),
        ] {
            let data: Vec<u8> = (0..h * w)
                .flat_map(|p| (0..samples).map(move |c| value(p, c)))
                .collect();
            let name = format!("{color:?}.png");
            encode(
                &dir.path().join(&name),
                color,
                BitDepth::Eight,
                (3, 2),
                &data,
            );
            check(&name, channels, &value);
        }
        // 16 bits keep their high byte.
        let data: Vec<u8> = (0..h * w)
            .flat_map(|p| (0..3).flat_map(move |c| [value(p, c), 0xff]))
            .collect();
        encode(
            &dir.path().join("rgb16.png"),
            ColorType::Rgb,
            BitDepth::Sixteen,
            (3, 2),
            &data,
        );
        check("rgb16.png", 3, &value);
        // A palette (as segmentation masks often are) becomes its colours.
        let index = |p: usize| (p % 2) as u8;
        let data: Vec<u8> = (0..h * w).map(index).collect();
        encode(
            &dir.path().join("indexed.png"),
            ColorType::Indexed,
            BitDepth::Eight,
            (3, 2),
            &data,
        );
        let palette = [[10, 20, 30], [200, 150, 100]];
        check("indexed.png", 3, &|p, c| palette[index(p) as usize][c]);
        // 1-bit gray (a sketch) is scaled to 0 and 255: pixels 1, 0, 1 in each 3-pixel row.
        encode(
            &dir.path().join("bits.png"),
            ColorType::Grayscale,
            BitDepth::One,
            (3, 2),
            &[0b1010_0000; 2],
        );
        check("bits.png", 1, &|p, _| if p % 3 == 1 { 0 } else { 255 });
    }

    /// The header is checked before decoding: one side past the largest image size is enough;
    /// a side of exactly that size is read.
    #[test]
    fn pngs_past_the_largest_image_size_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let max = crate::config::MAX_IMAGE_SIZE as u32;
        for (w, h) in [(max, 1), (1, max), (max + 1, 1), (1, max + 1)] {
            let path = dir.path().join(format!("{w}x{h}.png"));
            let pixels: Vec<u8> = (0..w * h).map(|i| (i % 251) as u8).collect();
            encode(
                &path,
                ColorType::Grayscale,
                BitDepth::Eight,
                (w, h),
                &pixels,
            );
            if w.max(h) == max {
                let png = read_png(&path).unwrap();
                assert_eq!(
                    (png.channels, png.height, png.width),
                    (1, h as usize, w as usize)
                );
                assert_eq!(png.data[250], 250.0 / 127.5 - 1.0);
            } else {
                let err = read_png(&path).unwrap_err().to_string();
                assert!(
                    err.contains("larger than mcdm's largest image size"),
                    "{err}"
                );
            }
        }
    }

    /// The reference scripts' `((x + 1) * 127.5).clamp(0, 255).to(uint8)`: truncated, not
    /// rounded, and channel-last out of channel-first.
    #[test]
    fn samples_are_quantised_as_the_reference_scripts_do() {
        // Channels of two pixels: [-1, 1], [0, 0.5], [-2, 0.999].
        let x = [-1.0, 1.0, 0.0, 0.5, -2.0, 0.999];
        assert_eq!(to_rgb8(&x, 1, 2), [0, 127, 0, 255, 191, 254]);
        assert_eq!(to_rgb8(&[3.0, -0.999, 0.2], 1, 1), [255, 0, 153]);
        // Two rows: planes of h * w values.
        let x: Vec<f32> = (0..12).map(|i| i as f32 / 8.0 - 1.0).collect();
        let planes = to_rgb8(&x, 2, 2);
        assert_eq!(planes[..6], [0, 63, 127, 15, 79, 143]);
        assert_eq!(planes[9..], [47, 111, 175]);
    }

    #[test]
    fn grid_tiles_row_by_row_between_white_gaps() {
        let (h, w, cols) = (2, 3, 2);
        // Five images never 255, so that every white pixel is a gap.
        let images: Vec<Vec<u8>> = (0..5)
            .map(|i| (0..3 * h * w).map(|k| (i * 40 + k) as u8).collect())
            .collect();
        let (g, gh, gw) = grid(&images, h, w, cols);
        // 3 rows of 2 pixels and 4 gaps of 2; 2 columns of 3 and 3 gaps.
        assert_eq!((gh, gw), (14, 12));
        assert_eq!(g.len(), 3 * 14 * 12);
        for (i, img) in images.iter().enumerate() {
            let (top, left) = (2 + (i / 2) * 4, 2 + (i % 2) * 5);
            for y in 0..h {
                for x in 0..w {
                    let at = ((top + y) * gw + left + x) * 3;
                    assert_eq!(
                        g[at..at + 3],
                        img[(y * w + x) * 3..][..3],
                        "image {i} ({y}, {x})"
                    );
                }
            }
        }
        let white = g.iter().filter(|&&v| v == 255).count();
        assert_eq!(
            white,
            g.len() - 5 * 3 * h * w,
            "gaps and the empty sixth cell"
        );
    }
}

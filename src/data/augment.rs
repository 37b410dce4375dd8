//! Training / validation transforms in the style of GluonCV's `SegmentationDataset`, as SageMaker documents them for
//! its built-in algorithm ("the long side is set to base_size multiplied by a random number from 0.5 to 2.0, the
//! short side preserves the aspect ratio"; "a random square crop of crop_size").
//!
//! Training ([`train_transform`], the long-side variant of GluonCV `_sync_transform`), random draws in this order:
//! 1. horizontal flip with probability 0.5 (image and label together);
//! 2. the long side is rescaled to a random integer in `[int(base_size*0.5), int(base_size*2.0)]` (inclusive), the
//!    short side to `int(short*long/long_side + 0.5)`; image bilinear (Pillow's `BILINEAR`, which antialiases when
//!    shrinking), label nearest (Pillow's `NEAREST`: source = floor((x+0.5)*in/out));
//! 3. where the rescaled image is smaller than the crop, it is padded right/bottom: image with the ImageNet MEAN
//!    colour (so it normalises to exactly 0), label with 255 (ignore) — GluonCV pads with 0, we follow the issue;
//! 4. a random `crop_size`×`crop_size` window: x1 in `[0, w-crop]`, then y1 in `[0, h-crop]`;
//! 5. normalisation `(x/255 - mean)/std`, output CHW f32.
//!
//! GluonCV also applies a random Gaussian blur (p=0.5), and older GluonCV releases scale the SHORT side and rotate
//! by ±10°; SageMaker documents none of these and they are not done here.
//!
//! Validation ([`val_transform`], GluonCV `_val_sync_transform`): short side → crop_size (long side
//! `int(long*crop/short)`, truncated), centre crop with Python's round-half-to-even offset. Whole image
//! ([`whole_transform`]): no resize or crop, only normalisation (validation_mini_batch_size = 1).
//!
//! The resize is computed only for the pixels inside the crop window (each output pixel of a Pillow-style
//! separable resample depends only on its own coordinate), so a 2× upscale followed by a crop costs the crop, not the
//! whole upscaled image. The flip is folded into the coefficient tables, so the inputs are never copied.
//! The `*_into` variants write into caller buffers (the loader's batch), the others return a [`Sample`].

use image::{GrayImage, RgbImage};
use rand::Rng;

use super::{IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD};

/// Round a crop size UP to a multiple of 8, as the built-in algorithm does (`crop_size` 240 stays, 241 → 248).
pub fn round_crop_size(crop: u32) -> u32 {
    crop.div_ceil(8).saturating_mul(8)
}

/// One transformed example: a normalised CHW image and its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `[3, height, width]`, normalised with the ImageNet mean / std.
    pub image: Vec<f32>,
    /// `[height, width]`, labels with 255 = ignore.
    pub label: Vec<u8>,
    pub height: u32,
    pub width: u32,
}

/// The random choices a training transform made (for tests and debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainDraw {
    pub flipped: bool,
    /// The rescaled size before padding.
    pub resized_width: u32,
    pub resized_height: u32,
    /// Top-left of the crop in the padded, rescaled image.
    pub x1: u32,
    pub y1: u32,
}

/// Why a pair of image and label could not be transformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AugmentError {
    #[error(
        "image is {image_w}x{image_h} but its annotation is {label_w}x{label_h}; an annotation must have exactly \
         the size of its image"
    )]
    SizeMismatch {
        image_w: u32,
        image_h: u32,
        label_w: u32,
        label_h: u32,
    },
    #[error("image has a zero dimension ({width}x{height}); replace it with a real image")]
    ZeroSize { width: u32, height: u32 },
    #[error("invalid transform setting: {0}")]
    Settings(String),
}

fn check_pair(image: &RgbImage, label: &GrayImage) -> Result<(u32, u32), AugmentError> {
    let (w, h) = image.dimensions();
    if label.dimensions() != (w, h) {
        return Err(AugmentError::SizeMismatch {
            image_w: w,
            image_h: h,
            label_w: label.width(),
            label_h: label.height(),
        });
    }
    if w == 0 || h == 0 {
        return Err(AugmentError::ZeroSize { width: w, height: h });
    }
    Ok((w, h))
}

/// GluonCV's random training transform (see the module docs): flip, rescale, pad, crop, normalise.
pub fn train_transform<R: Rng + ?Sized>(
    image: &RgbImage,
    label: &GrayImage,
    base_size: u32,
    crop_size: u32,
    rng: &mut R,
) -> Result<Sample, AugmentError> {
    train_transform_with_draw(image, label, base_size, crop_size, rng).map(|(s, _)| s)
}

/// [`train_transform`], also returning the random choices it made.
pub fn train_transform_with_draw<R: Rng + ?Sized>(
    image: &RgbImage,
    label: &GrayImage,
    base_size: u32,
    crop_size: u32,
    rng: &mut R,
) -> Result<(Sample, TrainDraw), AugmentError> {
    let (mut out, mut lab) = crop_buffers(crop_size);
    let draw = train_transform_into(image, label, base_size, crop_size, rng, &mut out, &mut lab)?;
    Ok((sample(out, lab, crop_size), draw))
}

/// [`train_transform`] writing into caller-provided buffers: `out_image` of `3*crop*crop` (CHW) and `out_label`
/// of `crop*crop` (the loader writes straight into its batch this way). Returns the random choices made.
pub fn train_transform_into<R: Rng + ?Sized>(
    image: &RgbImage,
    label: &GrayImage,
    base_size: u32,
    crop_size: u32,
    rng: &mut R,
    out_image: &mut [f32],
    out_label: &mut [u8],
) -> Result<TrainDraw, AugmentError> {
    let (w, h) = check_pair(image, label)?;
    if base_size == 0 || crop_size == 0 {
        return Err(AugmentError::Settings(format!(
            "base_size ({base_size}) and crop_size ({crop_size}) must be positive"
        )));
    }
    check_buffers(crop_size, out_image, out_label)?;
    let flipped = rng.random_bool(0.5);
    let lo = (base_size / 2).max(1);
    let hi = base_size.saturating_mul(2).max(lo);
    let long = rng.random_range(lo..=hi);
    let (ow, oh) = if h > w {
        (scale_round(w, long, h), long)
    } else {
        (long, scale_round(h, long, w))
    };
    let (pw, ph) = (ow.max(crop_size), oh.max(crop_size));
    let x1 = rng.random_range(0..=pw - crop_size);
    let y1 = rng.random_range(0..=ph - crop_size);
    resize_crop_into(
        image,
        label,
        flipped,
        (ow, oh),
        (x1, y1),
        crop_size,
        out_image,
        out_label,
    );
    Ok(TrainDraw {
        flipped,
        resized_width: ow,
        resized_height: oh,
        x1,
        y1,
    })
}

fn crop_buffers(crop: u32) -> (Vec<f32>, Vec<u8>) {
    let n = (crop as usize) * (crop as usize);
    (vec![0f32; 3 * n], vec![IGNORE_LABEL; n])
}

fn sample(image: Vec<f32>, label: Vec<u8>, crop: u32) -> Sample {
    Sample {
        image,
        label,
        height: crop,
        width: crop,
    }
}

fn check_buffers(crop: u32, out_image: &[f32], out_label: &[u8]) -> Result<(), AugmentError> {
    let n = (crop as usize) * (crop as usize);
    if out_image.len() != 3 * n || out_label.len() != n {
        return Err(AugmentError::Settings(format!(
            "output buffers hold {} values and {} labels, a {crop}x{crop} crop needs {} and {n}",
            out_image.len(),
            out_label.len(),
            3 * n
        )));
    }
    Ok(())
}

/// `int(a * num / den + 0.5)`, at least 1.
fn scale_round(a: u32, num: u32, den: u32) -> u32 {
    let v = (2 * u64::from(a) * u64::from(num) + u64::from(den)) / (2 * u64::from(den));
    v.clamp(1, u64::from(u32::MAX)) as u32
}

/// Python's `round(d / 2)` for a non-negative integer `d` (round half to even).
fn half_round_even(d: u32) -> u32 {
    let q = d / 2;
    if d % 2 == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// GluonCV's deterministic validation transform: short side → `crop_size`, centre crop, normalise.
pub fn val_transform(image: &RgbImage, label: &GrayImage, crop_size: u32) -> Result<Sample, AugmentError> {
    let (mut out, mut lab) = crop_buffers(crop_size);
    val_transform_into(image, label, crop_size, &mut out, &mut lab)?;
    Ok(sample(out, lab, crop_size))
}

/// [`val_transform`] writing into caller-provided buffers (`3*crop*crop` values, `crop*crop` labels).
pub fn val_transform_into(
    image: &RgbImage,
    label: &GrayImage,
    crop_size: u32,
    out_image: &mut [f32],
    out_label: &mut [u8],
) -> Result<(), AugmentError> {
    let (w, h) = check_pair(image, label)?;
    if crop_size == 0 {
        return Err(AugmentError::Settings("crop_size must be positive".to_string()));
    }
    check_buffers(crop_size, out_image, out_label)?;
    let trunc = |a: u32, num: u32, den: u32| ((u64::from(a) * u64::from(num)) / u64::from(den)).max(1) as u32;
    let (ow, oh) = if w > h {
        (trunc(w, crop_size, h), crop_size)
    } else {
        (crop_size, trunc(h, crop_size, w))
    };
    let x1 = half_round_even(ow.saturating_sub(crop_size));
    let y1 = half_round_even(oh.saturating_sub(crop_size));
    resize_crop_into(image, label, false, (ow, oh), (x1, y1), crop_size, out_image, out_label);
    Ok(())
}

/// Whole-image transform: the image at its own size, normalised; labels unchanged.
pub fn whole_transform(image: &RgbImage, label: &GrayImage) -> Result<Sample, AugmentError> {
    let (w, h) = check_pair(image, label)?;
    let n = (w as usize) * (h as usize);
    let mut out = vec![0f32; 3 * n];
    let (mul, add) = norm_coeffs();
    for (i, p) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = f32::from(p.0[c]) * mul[c] + add[c];
        }
    }
    Ok(Sample {
        image: out,
        label: label.as_raw().clone(),
        height: h,
        width: w,
    })
}

/// The 8-bit image that [`whole_transform`] normalised into `image` (`[3, height, width]`): each sample is
/// `(x − add) / mul`, rounded, which gives back exactly the byte it came from. Whole-image validation needs the
/// bytes again to score each image through [`crate::infer::Inference`], as `serve` answers it. `None` when `image`
/// does not hold 3 × `width` × `height` values.
pub fn denormalised_rgb(image: &[f32], width: u32, height: u32) -> Option<RgbImage> {
    let n = (width as usize) * (height as usize);
    if image.len() != 3 * n {
        return None;
    }
    let (mul, add) = norm_coeffs();
    let byte = |c: usize, i: usize| ((image[c * n + i] - add[c]) / mul[c]).round().clamp(0.0, 255.0) as u8;
    let mut raw = Vec::with_capacity(3 * n);
    for i in 0..n {
        raw.extend([byte(0, i), byte(1, i), byte(2, i)]);
    }
    RgbImage::from_raw(width, height, raw)
}

/// `v * mul + add == (v/255 - mean)/std`.
fn norm_coeffs() -> ([f32; 3], [f32; 3]) {
    let (mul, shift) = crate::normalize::scale_shift(IMAGENET_MEAN, IMAGENET_STD);
    (mul, shift.map(|s| -s))
}

/// Pillow-style resampling coefficients for a window of output coordinates.
struct Coeffs {
    /// First source index of each output coordinate's taps.
    start: Vec<usize>,
    /// Number of taps of each output coordinate (`start + count <= in_size`).
    count: Vec<usize>,
    /// `taps` weights per output coordinate (zero-padded), normalised to sum 1.
    weights: Vec<f32>,
    taps: usize,
}

impl Coeffs {
    /// Bilinear (triangle) coefficients for output coordinates `out_lo..out_hi` of an `in_size` → `out_size`
    /// resize, like Pillow's `precompute_coeffs`. With `flip`, the source is read mirrored.
    fn bilinear(in_size: u32, out_size: u32, out_lo: u32, out_hi: u32, flip: bool) -> Self {
        let in_len = in_size as usize;
        let scale = f64::from(in_size) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = filterscale; // triangle filter support 1.0
        let taps = (support.ceil() as usize) * 2 + 1;
        let n = (out_hi - out_lo) as usize;
        let mut start = Vec::with_capacity(n);
        let mut counts = Vec::with_capacity(n);
        let mut weights = vec![0f32; n * taps];
        let mut tmp = vec![0f64; taps];
        for (k, xx) in (out_lo..out_hi).enumerate() {
            let center = (f64::from(xx) + 0.5) * scale;
            // `int()` truncates, as in C; the clamps keep 1 <= count and start + count <= in_size.
            let xmin = ((center - support + 0.5) as i64).clamp(0, i64::from(in_size) - 1) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, i64::from(in_size)) as usize;
            let count = xmax.saturating_sub(xmin).clamp(1, taps);
            let mut total = 0.0;
            for (x, t) in tmp.iter_mut().enumerate().take(count) {
                let d = ((x + xmin) as f64 - center + 0.5) / filterscale;
                let wgt = (1.0 - d.abs()).max(0.0);
                *t = wgt;
                total += wgt;
            }
            let row = &mut weights[k * taps..(k + 1) * taps];
            if total > 0.0 {
                for x in 0..count {
                    row[x] = (tmp[x] / total) as f32;
                }
            } else {
                row[0] = 1.0;
            }
            if flip {
                // Tap x of the mirrored source is column in_size-1-(xmin+x) of the original: reverse the taps.
                row[..count].reverse();
                start.push(in_len - (xmin + count));
            } else {
                start.push(xmin);
            }
            counts.push(count);
        }
        Self {
            start,
            count: counts,
            weights,
            taps,
        }
    }

    /// First source index and the weights of output coordinate `k` (relative to `out_lo`).
    fn get(&self, k: usize) -> (usize, &[f32]) {
        let w = &self.weights[k * self.taps..(k + 1) * self.taps];
        (self.start[k], &w[..self.count[k]])
    }
}

/// Pillow `NEAREST` source index for output coordinate `x` of an `in_size` → `out_size` resize.
fn nearest(x: u32, in_size: u32, out_size: u32) -> u32 {
    let v = ((2 * u64::from(x) + 1) * u64::from(in_size)) / (2 * u64::from(out_size));
    v.min(u64::from(in_size) - 1) as u32
}

thread_local! {
    /// Per-thread scratch for the resampler (intermediate rows, one accumulated row), reused across calls.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`resize_crop_into`] into fresh buffers.
#[cfg(test)]
fn resize_crop(
    image: &RgbImage,
    label: &GrayImage,
    flip: bool,
    resized: (u32, u32),
    offset: (u32, u32),
    crop: u32,
) -> Sample {
    let (mut out, mut lab) = crop_buffers(crop);
    resize_crop_into(image, label, flip, resized, offset, crop, &mut out, &mut lab);
    sample(out, lab, crop)
}

/// Resize (image bilinear, label nearest) to `resized`, pad to at least `crop`, cut the `crop`×`crop` window at
/// `offset`, normalise, writing `out` (CHW, `3*crop*crop`) and `lab` (`crop*crop`). Only the window is computed.
#[allow(clippy::too_many_arguments)]
fn resize_crop_into(
    image: &RgbImage,
    label: &GrayImage,
    flip: bool,
    resized: (u32, u32),
    offset: (u32, u32),
    crop: u32,
    out: &mut [f32],
    lab: &mut [u8],
) {
    let (w, h) = image.dimensions();
    let (ow, oh) = resized;
    let (x1, y1) = offset;
    let c = crop as usize;
    let n = c * c;
    // Window of the rescaled image inside the crop; the rest of the crop is padding.
    let xe = ow.min(x1 + crop);
    let ye = oh.min(y1 + crop);
    let cw = xe.saturating_sub(x1) as usize;
    let chh = ye.saturating_sub(y1) as usize;

    // Padding: label 255, image 0 (the mean colour normalises to exactly 0). Only the parts outside the window.
    for y in 0..c {
        let from = if y < chh { cw } else { 0 };
        lab[y * c + from..(y + 1) * c].fill(IGNORE_LABEL);
        for ch in 0..3 {
            out[ch * n + y * c + from..ch * n + (y + 1) * c].fill(0.0);
        }
    }

    if cw > 0 && chh > 0 {
        // Labels: nearest neighbour.
        let lw = label.width() as usize;
        let lraw = label.as_raw();
        let cols: Vec<usize> = (x1..xe)
            .map(|x| {
                let sx = nearest(x, w, ow) as usize;
                if flip {
                    lw - 1 - sx
                } else {
                    sx
                }
            })
            .collect();
        for (i, y) in (y1..ye).enumerate() {
            let sy = nearest(y, h, oh) as usize;
            let src = &lraw[sy * lw..(sy + 1) * lw];
            let dst = &mut lab[i * c..i * c + cw];
            for (d, &sx) in dst.iter_mut().zip(&cols) {
                *d = src[sx];
            }
        }

        // Image: separable bilinear, horizontal pass on the needed source rows, then vertical.
        let hc = Coeffs::bilinear(w, ow, x1, xe, flip);
        let vc = Coeffs::bilinear(h, oh, y1, ye, false);
        let row_lo = vc.start[0];
        let row_hi = (0..chh)
            .map(|k| {
                let (s, wts) = vc.get(k);
                s + wts.len()
            })
            .max()
            .unwrap_or(row_lo + 1)
            .min(h as usize);
        let raw = image.as_raw();
        let stride = 3 * w as usize;
        // No borrow of SCRATCH outlives these one-line accesses, so `take` cannot conflict.
        let mut scratch = SCRATCH.with(std::cell::RefCell::take);
        let (tmp, acc) = (&mut scratch.0, &mut scratch.1);
        tmp.clear();
        tmp.resize((row_hi - row_lo) * cw * 3, 0.0);
        acc.clear();
        acc.resize(cw * 3, 0.0);
        for (r, trow) in (row_lo..row_hi).zip(tmp.chunks_exact_mut(cw * 3)) {
            let src = &raw[r * stride..(r + 1) * stride];
            for (j, px) in trow.chunks_exact_mut(3).enumerate() {
                let (s, wts) = hc.get(j);
                let (mut a, mut b, mut cc) = (0f32, 0f32, 0f32);
                let taps = src.get(s * 3..(s + wts.len()) * 3).unwrap_or(&[]);
                for (&wt, p) in wts.iter().zip(taps.chunks_exact(3)) {
                    a += wt * f32::from(p[0]);
                    b += wt * f32::from(p[1]);
                    cc += wt * f32::from(p[2]);
                }
                px[0] = a;
                px[1] = b;
                px[2] = cc;
            }
        }
        let (mul, add) = norm_coeffs();
        for i in 0..chh {
            let (s, wts) = vc.get(i);
            acc.iter_mut().for_each(|v| *v = 0.0);
            for (t, &wt) in wts.iter().enumerate() {
                if wt == 0.0 {
                    continue;
                }
                let r = (s + t).saturating_sub(row_lo);
                if let Some(trow) = tmp.get(r * cw * 3..(r + 1) * cw * 3) {
                    for (a, &v) in acc.iter_mut().zip(trow) {
                        *a += wt * v;
                    }
                }
            }
            for ch in 0..3 {
                let dst = &mut out[ch * n + i * c..ch * n + i * c + cw];
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = acc[j * 3 + ch] * mul[ch] + add[ch];
                }
            }
        }
        SCRATCH.with(|s| s.replace(scratch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Distinct colours per label (every pair differs by >= 100 in some channel); index 8 is the ignore colour.
    const COLOURS: [[u8; 3]; 9] = [
        [20, 20, 20],
        [230, 20, 20],
        [20, 230, 20],
        [20, 20, 230],
        [230, 230, 20],
        [230, 20, 230],
        [20, 230, 230],
        [230, 230, 230],
        [125, 125, 20],
    ];

    fn colour_of(label: u8) -> [u8; 3] {
        if label == IGNORE_LABEL {
            COLOURS[8]
        } else {
            COLOURS[usize::from(label) % 8]
        }
    }

    /// An image whose colour encodes its label: irregular blocks (sizes 14..40 px) plus an ignore band.
    fn colour_coded(w: u32, h: u32, seed: u64) -> (RgbImage, GrayImage) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut xs = vec![0u32];
        while *xs.last().unwrap_or(&w) < w {
            let last = *xs.last().unwrap_or(&w);
            xs.push(last + rng.random_range(14..40));
        }
        let mut ys = vec![0u32];
        while *ys.last().unwrap_or(&h) < h {
            let last = *ys.last().unwrap_or(&h);
            ys.push(last + rng.random_range(14..40));
        }
        let mut cells = Vec::new();
        for _ in 0..xs.len() * ys.len() {
            cells.push(if rng.random_bool(0.1) {
                IGNORE_LABEL
            } else {
                rng.random_range(0..8u8)
            });
        }
        let cell = |x: u32, y: u32| {
            let cx = xs.iter().rposition(|&s| s <= x).unwrap_or(0);
            let cy = ys.iter().rposition(|&s| s <= y).unwrap_or(0);
            cells[cy * xs.len() + cx]
        };
        let label = GrayImage::from_fn(w, h, |x, y| Luma([cell(x, y)]));
        let image = RgbImage::from_fn(w, h, |x, y| Rgb(colour_of(label.get_pixel(x, y)[0])));
        (image, label)
    }

    fn unnormalise(s: &Sample, x: usize, y: usize) -> [f32; 3] {
        let n = (s.width * s.height) as usize;
        let i = y * s.width as usize + x;
        let mut px = [0f32; 3];
        for c in 0..3 {
            px[c] = (s.image[c * n + i] * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255.0;
        }
        px
    }

    fn near(px: [f32; 3], colour: [f32; 3], tol: f32) -> bool {
        px.iter().zip(colour).all(|(a, b)| (a - b).abs() <= tol)
    }

    /// Counts (checked, misaligned) pixels: each pixel whose 8 neighbours carry the same label must have exactly
    /// its label's colour (or, for 255, the ignore colour or the mean padding colour). The crop's outer frame is not
    /// checked: its neighbours outside the window are unknown.
    fn misaligned(s: &Sample) -> (usize, usize) {
        let (w, h) = (s.width as i64, s.height as i64);
        let mean = [
            IMAGENET_MEAN[0] * 255.0,
            IMAGENET_MEAN[1] * 255.0,
            IMAGENET_MEAN[2] * 255.0,
        ];
        let (mut checked, mut bad) = (0, 0);
        for y in 0..h {
            for x in 0..w {
                let l = s.label[(y * w + x) as usize];
                let interior = (-1..=1).all(|dy| {
                    (-1..=1).all(|dx| {
                        let (nx, ny) = (x + dx, y + dy);
                        nx >= 0 && ny >= 0 && nx < w && ny < h && s.label[(ny * w + nx) as usize] == l
                    })
                });
                if !interior {
                    continue;
                }
                checked += 1;
                let px = unnormalise(s, x as usize, y as usize);
                let want = colour_of(l).map(f32::from);
                let ok = near(px, want, 0.5) || (l == IGNORE_LABEL && near(px, mean, 0.01));
                if !ok {
                    if bad < 5 {
                        eprintln!("bad ({x},{y}) label {l} px {px:?}");
                    }
                    bad += 1;
                }
            }
        }
        (checked, bad)
    }

    #[test]
    fn crop_size_rounds_up_to_multiple_of_8() {
        assert_eq!(round_crop_size(240), 240);
        assert_eq!(round_crop_size(241), 248);
        assert_eq!(round_crop_size(17), 24);
        assert_eq!(round_crop_size(473), 480);
    }

    #[test]
    fn output_is_always_crop_by_crop() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let sizes = [
            (5, 3),
            (1, 1),
            (3000, 2000),
            (120, 900),
            (900, 120),
            (500, 375),
            (375, 500),
            (1, 700),
        ];
        for (w, h) in sizes {
            let img = RgbImage::from_pixel(w, h, Rgb([1, 2, 3]));
            let lab = GrayImage::from_pixel(w, h, Luma([1]));
            // The built-in's defaults for a few shapes, then a smaller crop many times (same code path, cheaper
            // in unoptimised test builds).
            if w * h <= 15 || w * h >= 6_000_000 || h == 900 {
                let s = train_transform(&img, &lab, 520, 480, &mut rng).expect("train");
                assert_eq!((s.width, s.height), (480, 480), "{w}x{h}");
                assert_eq!((s.image.len(), s.label.len()), (3 * 480 * 480, 480 * 480));
            }
            let reps = if w * h >= 6_000_000 { 1 } else { 10 };
            for _ in 0..reps {
                let s = train_transform(&img, &lab, 130, 120, &mut rng).expect("train");
                assert_eq!((s.width, s.height), (120, 120), "{w}x{h}");
                assert_eq!((s.image.len(), s.label.len()), (3 * 120 * 120, 120 * 120));
            }
            let v = val_transform(&img, &lab, 120).expect("val");
            assert_eq!(
                (v.width, v.height, v.image.len(), v.label.len()),
                (120, 120, 3 * 120 * 120, 120 * 120)
            );
            assert!(v.label.iter().all(|&l| l == 1), "validation never pads");
        }
    }

    #[test]
    fn rescale_range_and_aspect_follow_gluoncv() {
        let img = RgbImage::new(100, 75);
        let lab = GrayImage::new(100, 75);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (mut min_long, mut max_long) = (u32::MAX, 0);
        let mut flips = 0;
        for _ in 0..1500 {
            let (_, d) = train_transform_with_draw(&img, &lab, 100, 16, &mut rng).expect("train");
            min_long = min_long.min(d.resized_width);
            max_long = max_long.max(d.resized_width);
            assert_eq!(d.resized_height, (f64::from(d.resized_width) * 0.75 + 0.5) as u32);
            flips += usize::from(d.flipped);
            assert!(d.x1 + 16 <= d.resized_width.max(16) && d.y1 + 16 <= d.resized_height.max(16));
        }
        assert_eq!(
            (min_long, max_long),
            (50, 200),
            "long side spans [base/2, 2*base] inclusive"
        );
        assert!((650..850).contains(&flips), "flip p=0.5: {flips}/1500");
        // Portrait: the long side is the height.
        let (_, d) = train_transform_with_draw(&RgbImage::new(30, 60), &GrayImage::new(30, 60), 100, 16, &mut rng)
            .expect("portrait");
        assert_eq!(d.resized_width, (f64::from(d.resized_height) * 0.5 + 0.5) as u32);
    }

    #[test]
    fn padding_is_ignore_label_and_mean_colour() {
        let (w, h) = (40, 30);
        let img = RgbImage::from_pixel(w, h, Rgb(COLOURS[1]));
        let lab = GrayImage::from_pixel(w, h, Luma([1]));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20 {
            // long side in [50, 200] < crop 240: always padded, crop offset 0.
            let (s, d) = train_transform_with_draw(&img, &lab, 100, 240, &mut rng).expect("train");
            assert_eq!((d.x1, d.y1), (0, 0));
            let (rw, rh) = (d.resized_width as usize, d.resized_height as usize);
            for y in 0..240usize {
                for x in 0..240usize {
                    let l = s.label[y * 240 + x];
                    let inside = x < rw && y < rh;
                    if inside {
                        assert_eq!(l, 1, "({x},{y}) inside {rw}x{rh}");
                        assert!(near(unnormalise(&s, x, y), COLOURS[1].map(f32::from), 0.5));
                    } else {
                        assert_eq!(l, IGNORE_LABEL, "({x},{y}) is padding");
                        for c in 0..3 {
                            assert_eq!(s.image[c * 240 * 240 + y * 240 + x], 0.0, "padding normalises to 0");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn image_and_label_stay_aligned_through_flip_rescale_crop() {
        // Sources whose long side >= base_size keep upscaling <= 2x, where bilinear mixing stays within 1 px of a
        // label boundary; small base sizes exercise heavy (antialiased) downscaling.
        let cases = [
            (300, 200, 290, 64),
            (211, 317, 200, 96),
            (400, 260, 60, 40),
            (257, 129, 250, 128),
        ];
        let mut total_checked = 0;
        let mut total_pixels = 0;
        for (ci, &(w, h, base, crop)) in cases.iter().enumerate() {
            let (img, lab) = colour_coded(w, h, ci as u64);
            let mut rng = ChaCha8Rng::seed_from_u64(100 + ci as u64);
            let mut flips = 0;
            for iter in 0..40 {
                let (s, d) = train_transform_with_draw(&img, &lab, base, crop, &mut rng).expect("train");
                flips += usize::from(d.flipped);
                let (checked, bad) = misaligned(&s);
                assert_eq!(
                    bad, 0,
                    "case {ci} iter {iter} {d:?}: {bad} of {checked} pixels misaligned"
                );
                total_checked += checked;
                total_pixels += (crop * crop) as usize;
            }
            assert!(flips > 10 && flips < 50, "both flip states exercised: {flips}");
            let v = val_transform(&img, &lab, crop).expect("val");
            assert_eq!(misaligned(&v).1, 0, "validation transform aligned");
        }
        assert!(
            total_checked * 10 > total_pixels * 6,
            "most pixels checked: {total_checked}/{total_pixels}"
        );
    }

    #[test]
    fn alignment_check_catches_a_label_only_flip_or_shift() {
        let (img, lab) = colour_coded(300, 200, 7);
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let s = train_transform(&img, &lab, 290, 96, &mut rng).expect("train");
        assert_eq!(misaligned(&s).1, 0);
        let w = 96usize;
        let mut flipped = s.clone();
        for row in flipped.label.chunks_exact_mut(w) {
            row.reverse();
        }
        let (checked, bad) = misaligned(&flipped);
        assert!(
            bad * 10 > checked,
            "label flipped but image not: {bad}/{checked} flagged"
        );
        let mut shifted = s.clone();
        for row in shifted.label.chunks_exact_mut(w) {
            row.rotate_right(3);
        }
        assert!(misaligned(&shifted).1 > 20, "a 3 px shift is caught");
        let mut transposed = s.clone();
        for y in 0..w {
            for x in 0..w {
                transposed.label[y * w + x] = s.label[x * w + y];
            }
        }
        assert!(misaligned(&transposed).1 > 20, "a transpose is caught");
    }

    #[test]
    fn same_seed_same_output_and_seeds_differ() {
        let (img, lab) = colour_coded(150, 100, 1);
        let a = train_transform(&img, &lab, 120, 64, &mut ChaCha8Rng::seed_from_u64(42)).expect("a");
        let b = train_transform(&img, &lab, 120, 64, &mut ChaCha8Rng::seed_from_u64(42)).expect("b");
        assert_eq!(a, b);
        let differ =
            (0..5u64).any(|s| train_transform(&img, &lab, 120, 64, &mut ChaCha8Rng::seed_from_u64(s)).expect("c") != a);
        assert!(differ);
    }

    #[test]
    fn validation_centre_crop_uses_round_half_even() {
        // Height 64 = crop: scale 1; label = column index, so label[0] is the crop's x offset.
        for (w, x1) in [(69u32, 2u8), (67, 2), (65, 0), (66, 1), (64, 0), (70, 3)] {
            let img = RgbImage::from_pixel(w, 64, Rgb([9, 9, 9]));
            let lab = GrayImage::from_fn(w, 64, |x, _| Luma([x as u8]));
            let s = val_transform(&img, &lab, 64).expect("val");
            assert_eq!(s.label[0], x1, "width {w}");
            assert_eq!(s.label[63], x1 + 63);
        }
        // Landscape 200x100 at crop 64: resized to 128x64, crop x in [32, 96).
        let lab = GrayImage::from_fn(200, 100, |x, _| Luma([u8::from(x >= 100)]));
        let img = RgbImage::from_fn(200, 100, |x, _| Rgb(colour_of(u8::from(x >= 100))));
        let s = val_transform(&img, &lab, 64).expect("val");
        assert_eq!((s.label[31], s.label[32]), (0, 1));
        assert_eq!(half_round_even(5), 2);
        assert_eq!(half_round_even(3), 2);
        assert_eq!(half_round_even(7), 4);
    }

    #[test]
    fn denormalising_a_whole_image_gives_back_every_byte() {
        // Every byte value in every channel, at pixel positions that differ per channel.
        let img = RgbImage::from_fn(64, 4, |x, y| {
            let v = (y * 64 + x) as u8;
            Rgb([v, v.wrapping_mul(7), 255 - v])
        });
        let s = whole_transform(&img, &GrayImage::new(64, 4)).expect("whole");
        assert_eq!(denormalised_rgb(&s.image, 64, 4), Some(img));
        assert_eq!(denormalised_rgb(&s.image, 64, 3), None);
    }

    #[test]
    fn whole_image_keeps_size_and_normalises() {
        let img = RgbImage::from_fn(7, 3, |x, y| Rgb([x as u8 * 30, y as u8 * 100, 255]));
        let lab = GrayImage::from_fn(7, 3, |x, _| Luma([if x == 0 { 255 } else { x as u8 }]));
        let s = whole_transform(&img, &lab).expect("whole");
        assert_eq!((s.width, s.height), (7, 3));
        assert_eq!(s.label, lab.as_raw().clone());
        let n = 21;
        let want = |v: f32, c: usize| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        assert!((s.image[2 * 7 + 4] - want(120.0, 0)).abs() < 1e-5);
        assert!((s.image[n + 7 + 4] - want(100.0, 1)).abs() < 1e-5);
        assert!((s.image[2 * n] - want(255.0, 2)).abs() < 1e-5);
    }

    #[test]
    fn mismatched_or_bad_settings_are_errors() {
        let img = RgbImage::new(10, 10);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let err = train_transform(&img, &GrayImage::new(10, 9), 520, 480, &mut rng).expect_err("mismatch");
        assert!(err.to_string().contains("10x10 but its annotation is 10x9"), "{err}");
        assert!(val_transform(&img, &GrayImage::new(9, 10), 32).is_err());
        assert!(whole_transform(&img, &GrayImage::new(9, 10)).is_err());
        assert!(train_transform(&img, &GrayImage::new(10, 10), 0, 480, &mut rng).is_err());
        assert!(train_transform(&img, &GrayImage::new(10, 10), 10, 0, &mut rng).is_err());
        assert!(train_transform(&RgbImage::new(0, 5), &GrayImage::new(0, 5), 10, 8, &mut rng).is_err());
    }

    #[test]
    fn windowed_resize_matches_full_resize_then_crop() {
        // The crop-window computation must equal resizing everything (window = whole image) and cropping.
        let (img, lab) = colour_coded(123, 77, 5);
        let img = RgbImage::from_fn(123, 77, |x, y| {
            let p = img.get_pixel(x, y).0;
            Rgb([p[0].wrapping_add((x * 7) as u8), p[1], p[2].wrapping_add((y * 3) as u8)])
        });
        for &(ow, oh, flip) in &[
            (250u32, 157u32, false),
            (61, 38, true),
            (123, 77, true),
            (300, 10, false),
        ] {
            let full = resize_crop(&img, &lab, flip, (ow, oh), (0, 0), ow.max(oh));
            let (x1, y1, crop) = (ow / 3, oh / 4, (ow.min(oh) / 2).max(1));
            let part = resize_crop(&img, &lab, flip, (ow, oh), (x1, y1), crop);
            let (fc, c) = (ow.max(oh) as usize, crop as usize);
            for y in 0..c {
                for x in 0..c {
                    let (fx, fy) = (x + x1 as usize, y + y1 as usize);
                    assert_eq!(part.label[y * c + x], full.label[fy * fc + fx]);
                    for ch in 0..3 {
                        let a = part.image[ch * c * c + y * c + x];
                        let b = full.image[ch * fc * fc + fy * fc + fx];
                        assert!(
                            (a - b).abs() < 1e-5,
                            "{ow}x{oh} flip {flip} ({x},{y}) ch {ch}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn into_variants_overwrite_dirty_buffers_completely() {
        let (img, lab) = colour_coded(90, 50, 3);
        for seed in 0..6u64 {
            // Crop 72 > the short side at small scales: exercises the padding writes too.
            let want = train_transform(&img, &lab, 60, 72, &mut ChaCha8Rng::seed_from_u64(seed)).expect("a");
            let (mut out, mut l) = (vec![f32::NAN; 3 * 72 * 72], vec![77u8; 72 * 72]);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            train_transform_into(&img, &lab, 60, 72, &mut rng, &mut out, &mut l).expect("b");
            assert_eq!(out, want.image);
            assert_eq!(l, want.label);
        }
        let want = val_transform(&img, &lab, 40).expect("val");
        let (mut out, mut l) = (vec![f32::NAN; 3 * 1600], vec![77u8; 1600]);
        val_transform_into(&img, &lab, 40, &mut out, &mut l).expect("val into");
        assert_eq!((out, l), (want.image, want.label));
        let err = val_transform_into(&img, &lab, 40, &mut [0.0; 10], &mut [0; 10]).expect_err("small buffers");
        assert!(err.to_string().contains("40x40 crop needs 4800 and 1600"), "{err}");
    }

    #[test]
    fn flip_mirrors_the_resized_image() {
        // Resizing a mirrored image equals mirroring the resized image (symmetric kernel).
        let img = RgbImage::from_fn(50, 20, |x, y| {
            Rgb([(x * 5) as u8, (y * 12) as u8, ((x * y) % 251) as u8])
        });
        let lab = GrayImage::from_fn(50, 20, |x, _| Luma([x as u8]));
        let (ow, oh) = (80u32, 32u32);
        let a = resize_crop(&img, &lab, false, (ow, oh), (0, 0), 80);
        let b = resize_crop(&img, &lab, true, (ow, oh), (0, 0), 80);
        for y in 0..oh as usize {
            for x in 0..ow as usize {
                let xm = ow as usize - 1 - x;
                assert_eq!(a.label[y * 80 + x], b.label[y * 80 + xm]);
                for ch in 0..3 {
                    let (p, q) = (a.image[ch * 6400 + y * 80 + x], b.image[ch * 6400 + y * 80 + xm]);
                    assert!((p - q).abs() < 1e-4, "({x},{y}) ch {ch}: {p} vs {q}");
                }
            }
        }
    }
}

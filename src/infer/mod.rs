//! One image (any size) → per-pixel class probabilities → class-index mask: the single inference path shared by
//! `serve`, `predict` and `demo`, so every way of asking the model gives the same answer. Training's whole-image
//! validation (`validation_mini_batch_size=1`) scores through here too; its crop validation scores batches of centre
//! crops ([`crate::train::validation`]). The end-to-end tests check that the saved model, scored through
//! `semseg predict`, matches the best epoch's mIOU.
//!
//! A network plugs in through the [`Segmenter`] trait (softmax probabilities at the size of the image it is given).
//! [`Inference`] wraps one with the policy for large images:
//!
//! **Large images are resized, not tiled.** When an image has more than [`InferenceLimits::max_model_pixels`] pixels
//! (default [`DEFAULT_MAX_MODEL_PIXELS`] = 1 Mpx, e.g. 1024 × 1024), it is downscaled (antialiased bilinear, aspect
//! ratio kept) until it fits, the network runs on the smaller image, and the probabilities are upsampled bilinearly
//! (half-pixel centres, as the networks' own final resize) back to the original size. A 960 × 540 image (0.5 Mpx)
//! runs at its own size; a 4000 × 3000 image runs at about 1182 × 886. Why resizing: training sees images whose long
//! side is `base_size` (520) × 0.5..2.0, so a downscaled photo is closer to what the network learned than full-size
//! tiles would be, and the cost per request is bounded (memory and time do not grow with the upload). The output is
//! always at the input's size; bilinear interpolation of probability vectors keeps every pixel summing to 1. For a
//! mask, the argmax is taken row by row while upsampling, so a full-size [C, H, W] array is never built.

pub mod encode;
pub mod model_adapter;

use std::fmt;

use image::imageops::{self, FilterType};
use image::RgbImage;
use rayon::prelude::*;

/// Default limit on the pixels the network sees per image; larger images are downscaled (see the module docs).
pub const DEFAULT_MAX_MODEL_PIXELS: u64 = 1024 * 1024;
/// Default shortest side the network sees; shorter sides are stretched (e.g. a 1 × 1 image runs at 32 × 32).
pub const DEFAULT_MIN_MODEL_SIDE: u32 = 32;

/// A segmentation network as inference sees it.
pub trait Segmenter: Send + Sync {
    /// The number of classes C (the length of every pixel's probability vector).
    fn num_classes(&self) -> usize;

    /// Softmax probabilities `[C, H, W]` (row-major f32) at the size of `image`, which is RGB with 8-bit samples.
    fn probabilities(&self, image: &RgbImage) -> anyhow::Result<Probabilities>;

    /// Per-pixel class scores `[C, H, W]` whose argmax is the mask: the probabilities, or anything that orders the
    /// classes of each pixel the same way (a network's logits, which saves the softmax).
    fn mask_scores(&self, image: &RgbImage) -> anyhow::Result<Probabilities> {
        self.probabilities(image)
    }

    /// The class-index mask `[H, W]` at the size of `image`: the argmax of [`Self::mask_scores`], unless the
    /// segmenter can do better (a GPU model takes the argmax there and copies back only the mask).
    fn mask(&self, image: &RgbImage) -> anyhow::Result<Mask> {
        Ok(self.mask_scores(image)?.argmax())
    }

    /// Runs the network once on a small grey image, so the first request does not pay for one-time set-up (GPU
    /// kernels and libraries loaded, buffers pooled).
    fn warm_up(&self) -> anyhow::Result<()> {
        self.mask(&RgbImage::from_pixel(
            WARM_UP_SIDE,
            WARM_UP_SIDE,
            image::Rgb([128, 128, 128]),
        ))
        .map(|_| ())
    }
}

/// Side of the warm-up image: large enough to touch every layer at a realistic tile size, small enough to cost
/// well under a second on a CPU.
const WARM_UP_SIDE: u32 = 128;

/// Per-pixel class probabilities, `[C, H, W]` row-major: `data[(c * height + y) * width + x]`.
#[derive(Clone, PartialEq)]
pub struct Probabilities {
    num_classes: usize,
    height: usize,
    width: usize,
    data: Vec<f32>,
}

impl fmt::Debug for Probabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Probabilities[{}, {}, {}]",
            self.num_classes, self.height, self.width
        )
    }
}

/// An array whose length does not match its declared shape.
#[derive(Debug, thiserror::Error)]
#[error("an array of shape {shape:?} needs {expected} values, got {got}")]
pub struct ShapeError {
    pub shape: Vec<usize>,
    pub expected: usize,
    pub got: usize,
}

impl Probabilities {
    /// Wrap `data` laid out `[C, H, W]`.
    pub fn new(num_classes: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self, ShapeError> {
        let expected = num_classes * height * width;
        if data.len() != expected || num_classes == 0 {
            return Err(ShapeError {
                shape: vec![num_classes, height, width],
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            num_classes,
            height,
            width,
            data,
        })
    }

    /// Softmax over the class axis of logits laid out `[C, H, W]`, in place (numerically stable).
    pub fn from_logits(
        num_classes: usize,
        height: usize,
        width: usize,
        mut logits: Vec<f32>,
    ) -> Result<Self, ShapeError> {
        let plane = height * width;
        if logits.len() == num_classes * plane && num_classes > 0 {
            // Per pixel: the maximum and the sum of exponentials, over stripes of pixels in parallel.
            const STRIPE: usize = 4096;
            let mut max = vec![f32::NEG_INFINITY; plane];
            let mut sum = vec![0f32; plane];
            let classes = &logits;
            max.par_chunks_mut(STRIPE)
                .zip(sum.par_chunks_mut(STRIPE))
                .enumerate()
                .for_each(|(i, (max, sum))| {
                    let start = i * STRIPE;
                    for class in classes.chunks_exact(plane) {
                        for (m, &v) in max.iter_mut().zip(&class[start..]) {
                            *m = m.max(v);
                        }
                    }
                    for class in classes.chunks_exact(plane) {
                        for ((s, &m), &v) in sum.iter_mut().zip(&*max).zip(&class[start..]) {
                            *s += (v - m).exp();
                        }
                    }
                });
            // Then every value, in parallel over stripes of each class plane.
            logits.par_chunks_mut(plane).for_each(|class| {
                class
                    .chunks_mut(STRIPE)
                    .zip(max.chunks(STRIPE).zip(sum.chunks(STRIPE)))
                    .for_each(|(values, (max, sum))| {
                        for ((v, &m), &s) in values.iter_mut().zip(max).zip(sum) {
                            *v = (*v - m).exp() / s;
                        }
                    })
            });
        }
        Self::new(num_classes, height, width, logits)
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.num_classes, self.height, self.width]
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// The probability of `class` at (x, y).
    pub fn get(&self, class: usize, y: usize, x: usize) -> f32 {
        self.data[(class * self.height + y) * self.width + x]
    }

    /// The most probable class of every pixel (the lowest index on ties).
    pub fn argmax(&self) -> Mask {
        const STRIPE: usize = 4096;
        let plane = self.height * self.width;
        let mut labels = vec![0u8; plane];
        // Over stripes of pixels in parallel; each stripe walks the class planes in order.
        labels.par_chunks_mut(STRIPE).enumerate().for_each(|(i, labels)| {
            let start = i * STRIPE;
            let mut best = [f32::NEG_INFINITY; STRIPE];
            for (class, values) in self.data.chunks_exact(plane.max(1)).enumerate() {
                for ((b, l), &v) in best.iter_mut().zip(labels.iter_mut()).zip(&values[start..]) {
                    if v > *b {
                        *b = v;
                        *l = class_label(class);
                    }
                }
            }
        });
        Mask {
            width: self.width,
            height: self.height,
            labels,
        }
    }

    /// Bilinear resize (half-pixel centres, like `align_corners=False`) of every class plane to `width` × `height`.
    pub fn resized(&self, width: usize, height: usize) -> Probabilities {
        let plane = width * height;
        let mut data = vec![0f32; self.num_classes * plane];
        let resampler = Resampler::new(self, width, height);
        let mut row = vec![0f32; self.num_classes * width];
        for y in 0..height {
            resampler.row(self, y, &mut row);
            for (class, values) in row.chunks_exact(width.max(1)).enumerate() {
                let start = class * plane + y * width;
                data[start..start + width].copy_from_slice(values);
            }
        }
        Probabilities {
            num_classes: self.num_classes,
            height,
            width,
            data,
        }
    }

    /// The argmax of [`Self::resized`] without building the resized array.
    pub fn resized_argmax(&self, width: usize, height: usize) -> Mask {
        let resampler = Resampler::new(self, width, height);
        let mut row = vec![0f32; self.num_classes * width];
        let mut labels = vec![0u8; width * height];
        for (y, out) in labels.chunks_exact_mut(width.max(1)).enumerate().take(height) {
            resampler.row(self, y, &mut row);
            for (x, label) in out.iter_mut().enumerate() {
                let mut best = f32::NEG_INFINITY;
                for class in 0..self.num_classes {
                    let v = row[class * width + x];
                    if v > best {
                        best = v;
                        *label = class_label(class);
                    }
                }
            }
        }
        Mask { width, height, labels }
    }
}

/// Class indices are at most 253 (`num_classes` ≤ 254); larger indices saturate rather than wrap.
fn class_label(class: usize) -> u8 {
    u8::try_from(class).unwrap_or(u8::MAX)
}

/// Precomputed source positions for a bilinear resize with half-pixel centres.
struct Resampler {
    xs: Vec<(usize, usize, f32)>,
    ys: Vec<(usize, usize, f32)>,
    width: usize,
}

impl Resampler {
    fn new(src: &Probabilities, width: usize, height: usize) -> Self {
        Self {
            xs: axis(src.width, width),
            ys: axis(src.height, height),
            width,
        }
    }

    /// Output row `y` of every class into `out` (`[C, width]`).
    fn row(&self, src: &Probabilities, y: usize, out: &mut [f32]) {
        let (y0, y1, ly) = self.ys[y];
        for class in 0..src.num_classes {
            let base = class * src.height * src.width;
            let r0 = &src.data[base + y0 * src.width..base + (y0 + 1) * src.width];
            let r1 = &src.data[base + y1 * src.width..base + (y1 + 1) * src.width];
            let dst = &mut out[class * self.width..(class + 1) * self.width];
            for (d, &(x0, x1, lx)) in dst.iter_mut().zip(&self.xs) {
                let top = r0[x0] + (r0[x1] - r0[x0]) * lx;
                let bottom = r1[x0] + (r1[x1] - r1[x0]) * lx;
                *d = top + (bottom - top) * ly;
            }
        }
    }
}

/// For each output coordinate: the two source coordinates and the weight of the second.
fn axis(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f64 / dst.max(1) as f64;
    (0..dst)
        .map(|i| {
            let pos = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (pos.floor() as usize).min(src.saturating_sub(1));
            let i1 = (i0 + 1).min(src.saturating_sub(1));
            (i0, i1, (pos - i0 as f64) as f32)
        })
        .collect()
}

/// A class-index mask, one label per pixel, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    width: usize,
    height: usize,
    labels: Vec<u8>,
}

impl Mask {
    pub fn new(width: usize, height: usize, labels: Vec<u8>) -> Result<Self, ShapeError> {
        if labels.len() != width * height {
            return Err(ShapeError {
                shape: vec![height, width],
                expected: width * height,
                got: labels.len(),
            });
        }
        Ok(Self { width, height, labels })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// How many pixels carry each class, for classes `0..num_classes`.
    pub fn class_pixel_counts(&self, num_classes: usize) -> Vec<u64> {
        let mut counts = [0u64; 256];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts[..num_classes.min(256)].to_vec()
    }
}

/// Limits applied by [`Inference`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InferenceLimits {
    /// Images with more pixels are downscaled to fit before the network runs.
    pub max_model_pixels: u64,
    /// Image sides shorter than this are stretched to it before the network runs.
    pub min_model_side: u32,
}

impl Default for InferenceLimits {
    fn default() -> Self {
        Self {
            max_model_pixels: DEFAULT_MAX_MODEL_PIXELS,
            min_model_side: DEFAULT_MIN_MODEL_SIDE,
        }
    }
}

/// A [`Segmenter`] plus the large-image policy: what `serve`, `predict` and `demo` call.
pub struct Inference {
    segmenter: std::sync::Arc<dyn Segmenter>,
    limits: InferenceLimits,
}

impl fmt::Debug for Inference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inference")
            .field("num_classes", &self.segmenter.num_classes())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Inference {
    pub fn new(segmenter: std::sync::Arc<dyn Segmenter>, limits: InferenceLimits) -> Self {
        Self { segmenter, limits }
    }

    pub fn num_classes(&self) -> usize {
        self.segmenter.num_classes()
    }

    pub fn limits(&self) -> InferenceLimits {
        self.limits
    }

    /// The size the network runs at for an image of `width` × `height`: the same, or downscaled to fit
    /// `max_model_pixels` with the aspect ratio kept; a side under `min_model_side` is stretched to it (the networks
    /// downsample 8 to 32 times, so a few pixels would leave them nothing to work on).
    pub fn model_size(&self, width: u32, height: u32) -> (u32, u32) {
        let budget = self.limits.max_model_pixels.max(1);
        let fits = |w: u32, h: u32| u64::from(w) * u64::from(h) <= budget;
        let (mut w, mut h) = (width.max(1), height.max(1));
        if !fits(w, h) {
            let scale = (budget as f64 / (f64::from(w) * f64::from(h))).sqrt();
            w = ((f64::from(w) * scale).floor() as u32).max(1);
            h = ((f64::from(h) * scale).floor() as u32).max(1);
        }
        let min_side = self.limits.min_model_side;
        w = w.max(min_side);
        h = h.max(min_side);
        // Stretching a thin image may break the budget again: shorten its long side.
        while !fits(w, h) && (w > min_side || h > min_side) {
            if w >= h {
                w = (budget / u64::from(h)).clamp(u64::from(min_side), u64::from(w - 1)) as u32;
            } else {
                h = (budget / u64::from(w)).clamp(u64::from(min_side), u64::from(h - 1)) as u32;
            }
        }
        (w, h)
    }

    /// Run the network at [`Self::model_size`]; returns the probabilities at that size.
    fn run(&self, image: &RgbImage) -> anyhow::Result<Probabilities> {
        self.run_with(image, |input| self.segmenter.probabilities(input))
    }

    /// Run `network` on the image at [`Self::model_size`] and check the shape of what it returns.
    fn run_with(
        &self,
        image: &RgbImage,
        network: impl FnOnce(&RgbImage) -> anyhow::Result<Probabilities>,
    ) -> anyhow::Result<Probabilities> {
        let (width, height) = image.dimensions();
        let (mw, mh) = self.model_size(width, height);
        let resized;
        let input = if (mw, mh) == (width, height) {
            image
        } else {
            tracing::debug!(
                width,
                height,
                model_width = mw,
                model_height = mh,
                "downscaling a large image"
            );
            resized = imageops::resize(image, mw, mh, FilterType::Triangle);
            &resized
        };
        let probabilities = network(input)?;
        let expected = [self.segmenter.num_classes(), mh as usize, mw as usize];
        anyhow::ensure!(
            probabilities.shape() == expected,
            "the network returned probabilities of shape {:?} for an input needing {:?}",
            probabilities.shape(),
            expected
        );
        Ok(probabilities)
    }

    /// Softmax probabilities `[C, H, W]` at the image's own size.
    pub fn probabilities(&self, image: &RgbImage) -> anyhow::Result<Probabilities> {
        let (width, height) = image.dimensions();
        let probabilities = self.run(image)?;
        if probabilities.width() == width as usize && probabilities.height() == height as usize {
            Ok(probabilities)
        } else {
            Ok(probabilities.resized(width as usize, height as usize))
        }
    }

    /// The class-index mask at the image's own size.
    pub fn mask(&self, image: &RgbImage) -> anyhow::Result<Mask> {
        let (width, height) = image.dimensions();
        if self.model_size(width, height) == (width, height) {
            // At the image's own size the mask is the argmax of any scores that order the classes alike.
            let mask = self.segmenter.mask(image)?;
            anyhow::ensure!(
                (mask.width(), mask.height()) == (width as usize, height as usize),
                "the network returned a {}x{} mask for a {width}x{height} image",
                mask.width(),
                mask.height()
            );
            return Ok(mask);
        }
        // Resized, the mask follows the interpolated probabilities (interpolated logits could differ at edges).
        let probabilities = self.run(image)?;
        if probabilities.width() == width as usize && probabilities.height() == height as usize {
            Ok(probabilities.argmax())
        } else {
            Ok(probabilities.resized_argmax(width as usize, height as usize))
        }
    }
}

/// `image` as `[3, H, W]` f32, scaled to 0..1 and normalised per channel with `(x − mean) / std`: the input layout
/// of the networks.
pub fn normalised_chw(image: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = image.width() as usize * image.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    let (scale, shift) = crate::normalize::scale_shift(mean, std);
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(pixel.0[c]) * scale[c] - shift[c];
        }
    }
    out
}

/// A simple, exact [`Segmenter`] for tests and examples: each pixel's class is the nearest of a list of colours,
/// with softmax probabilities over negative squared colour distances divided by `temperature`.
#[derive(Clone, Debug)]
pub struct NearestColour {
    pub colours: Vec<[u8; 3]>,
    pub temperature: f32,
    /// Sleep this long per call, to simulate a slow network in tests.
    pub delay: std::time::Duration,
}

impl NearestColour {
    pub fn new(colours: Vec<[u8; 3]>) -> Self {
        Self {
            colours,
            temperature: 1000.0,
            delay: std::time::Duration::ZERO,
        }
    }
}

impl Segmenter for NearestColour {
    fn num_classes(&self) -> usize {
        self.colours.len()
    }

    fn probabilities(&self, image: &RgbImage) -> anyhow::Result<Probabilities> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let plane = w * h;
        let mut logits = vec![0f32; self.colours.len() * plane];
        for (i, pixel) in image.pixels().enumerate() {
            for (class, colour) in self.colours.iter().enumerate() {
                let d2: f32 = (0..3)
                    .map(|c| (f32::from(pixel.0[c]) - f32::from(colour[c])).powi(2))
                    .sum();
                logits[class * plane + i] = -d2 / self.temperature;
            }
        }
        Ok(Probabilities::from_logits(self.colours.len(), h, w, logits)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn two_colour_image(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, _| {
            if x < width / 2 {
                image::Rgb([250, 0, 0])
            } else {
                image::Rgb([0, 0, 250])
            }
        })
    }

    fn inference(max_model_pixels: u64) -> Inference {
        let seg = NearestColour::new(vec![[0, 0, 0], [255, 0, 0], [0, 0, 255]]);
        Inference::new(
            Arc::new(seg),
            InferenceLimits {
                max_model_pixels,
                min_model_side: 8,
            },
        )
    }

    fn assert_sums_to_one(p: &Probabilities) {
        let plane = p.width() * p.height();
        for i in 0..plane {
            let sum: f32 = (0..p.num_classes()).map(|c| p.as_slice()[c * plane + i]).sum();
            assert!((sum - 1.0).abs() < 1e-5, "pixel {i} sums to {sum}");
        }
    }

    #[test]
    fn softmax_is_stable_and_normalised() -> anyhow::Result<()> {
        let p = Probabilities::from_logits(3, 1, 2, vec![1000.0, 0.0, 1000.0, 0.0, -1000.0, 0.0])?;
        assert_sums_to_one(&p);
        assert!((p.get(0, 0, 0) - 0.5).abs() < 1e-6);
        assert!((p.get(0, 0, 1) - 1.0 / 3.0).abs() < 1e-6);
        assert!(Probabilities::new(2, 2, 2, vec![0.0; 7]).is_err());
        Ok(())
    }

    #[test]
    fn small_images_run_at_their_own_size() -> anyhow::Result<()> {
        let inf = inference(10_000);
        let img = two_colour_image(40, 30);
        assert_eq!(inf.model_size(40, 30), (40, 30));
        let p = inf.probabilities(&img)?;
        assert_eq!(p.shape(), [3, 30, 40]);
        assert_sums_to_one(&p);
        let mask = inf.mask(&img)?;
        assert_eq!(mask, p.argmax());
        assert_eq!(mask.class_pixel_counts(3), vec![0, 600, 600]);
        Ok(())
    }

    #[test]
    fn large_images_are_downscaled_and_answered_at_full_size() -> anyhow::Result<()> {
        let inf = inference(1000);
        let (mw, mh) = inf.model_size(400, 300);
        assert!(u64::from(mw * mh) <= 1000 && mw > mh, "{mw}x{mh}");
        assert_eq!(inference(1024 * 1024).model_size(4000, 3000), (1182, 886));
        assert_eq!(inference(1024 * 1024).model_size(960, 540), (960, 540));
        let img = two_colour_image(400, 300);
        let p = inf.probabilities(&img)?;
        assert_eq!(p.shape(), [3, 300, 400]);
        assert_sums_to_one(&p);
        let mask = inf.mask(&img)?;
        assert_eq!((mask.width(), mask.height()), (400, 300));
        assert_eq!(mask, p.argmax());
        // Away from the boundary the classes are exact.
        assert_eq!(mask.labels()[150 * 400 + 20], 1);
        assert_eq!(mask.labels()[150 * 400 + 380], 2);
        Ok(())
    }

    #[test]
    fn tiny_and_thin_images_are_stretched_within_the_budget() -> anyhow::Result<()> {
        let inf = inference(1000);
        assert_eq!(inf.model_size(1, 1), (8, 8));
        assert_eq!(inf.model_size(3, 20), (8, 20));
        let (w, h) = inf.model_size(1, 100_000);
        assert!(w == 8 && u64::from(w * h) <= 1000, "{w}x{h}");
        let img = two_colour_image(2, 1);
        assert_eq!(inf.probabilities(&img)?.shape(), [3, 1, 2]);
        assert_eq!(inf.mask(&img)?.labels(), &[1, 2]);
        Ok(())
    }

    #[test]
    fn resize_to_the_same_size_is_the_identity() -> anyhow::Result<()> {
        let p = Probabilities::from_logits(2, 3, 5, (0..30).map(|v| v as f32 * 0.37).collect())?;
        assert_eq!(p.resized(5, 3), p);
        let up = p.resized(10, 6);
        assert_sums_to_one(&up);
        Ok(())
    }

    #[test]
    fn normalisation_matches_the_formula() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 51]));
        let v = normalised_chw(&img, [0.5, 0.5, 0.2], [0.5, 0.25, 0.1]);
        let expected = [1.0, 1.0, -2.0, -2.0, 0.0, 0.0];
        for (a, b) in v.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
    }
}

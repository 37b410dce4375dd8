//! Rendering one sample: a textured background, free shapes, the guaranteed shapes in their cells, sensor noise; the
//! RGB pixels and the training labels (255 on the ignore band) come out of the same pass.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::plan::{Plan, SplitPlan};
use super::shapes::{make_geom, SHAPE_KINDS};
use crate::data::IGNORE_LABEL;

/// One rendered sample: RGB pixels and training labels (255 = ignore), row-major.
pub(super) struct Sample {
    pub(super) rgb: Vec<u8>,
    pub(super) labels: Vec<u8>,
}

/// The nominal hue (degrees) of shape class `class ≥ 1`: classes spread evenly around the colour wheel, class 1 red.
pub fn class_hue(class: u32, num_classes: u32) -> f32 {
    (class - 1) as f32 * 360.0 / (num_classes - 1) as f32
}

pub(super) fn render(plan: &Plan, split: &SplitPlan, i: usize) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    rng.set_stream(1 + (split.first_index + i) as u64);
    let (w, h) = (plan.width, plan.height);
    let mut canvas = Canvas {
        width: w,
        height: h,
        rgb: vec![[0.0; 3]; w * h],
        labels: vec![0; w * h],
    };
    paint_background(&mut canvas, &mut rng);
    let shape_classes = plan.num_classes - 1;

    // Free shapes, anywhere (possibly cut by the image edge), underneath the guaranteed ones.
    for _ in 0..rng.random_range(1..=3) {
        let class = rng.random_range(1..=shape_classes);
        let radius = rng.random_range(plan.free_radius.0..=plan.free_radius.1);
        let cx = rng.random_range(0.0..w as f32);
        let cy = rng.random_range(0.0..h as f32);
        paint_shape(plan, &mut canvas, class, cx, cy, radius, &mut rng);
    }

    // Guaranteed shapes, one per cell of a shuffled grid, fully inside their cells so none hides another.
    let (cols, rows) = split.grid;
    let (cell_w, cell_h) = (w as f32 / cols as f32, h as f32 / rows as f32);
    let mut cells: Vec<usize> = (0..cols * rows).collect();
    cells.shuffle(&mut rng);
    let hi = split.cell_max_radius.min(plan.free_radius.1);
    let lo = plan.min_radius.max(0.5 * hi).min(hi);
    for (k, &cell) in cells.iter().take(split.per_image).enumerate() {
        let class = 1 + (i + k * split.count) % shape_classes;
        let radius = rng.random_range(lo..=hi);
        let margin = radius + plan.half_border + 1.0;
        let (left, top) = ((cell % cols) as f32 * cell_w, (cell / cols) as f32 * cell_h);
        let cx = rng.random_range(left + margin..=(left + cell_w - margin).max(left + margin));
        let cy = rng.random_range(top + margin..=(top + cell_h - margin).max(top + margin));
        paint_shape(plan, &mut canvas, class, cx, cy, radius, &mut rng);
    }

    // Sensor noise (±6 per channel) and quantisation.
    let mut rgb = Vec::with_capacity(w * h * 3);
    for px in &canvas.rgb {
        let noise = rng.random::<u32>().to_le_bytes();
        for c in 0..3 {
            let n = (noise[c] as f32 - 127.5) * (6.0 / 127.5);
            rgb.push((px[c] + n).round().clamp(0.0, 255.0) as u8);
        }
    }
    Sample {
        rgb,
        labels: canvas.labels,
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

/// A muted (low-saturation) background colour.
fn muted_colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    hsv_to_rgb(
        rng.random_range(0.0..360.0),
        rng.random_range(0.0..0.3),
        rng.random_range(0.25..0.85),
    )
}

fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<[f32; 3]>,
    labels: Vec<u8>,
}

fn paint_background(canvas: &mut Canvas, rng: &mut ChaCha8Rng) {
    let (w, h) = (canvas.width, canvas.height);
    let (c1, c2) = (muted_colour(rng), muted_colour(rng));
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    // A weak lighting gradient over every texture.
    let light_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let light_amp: f32 = rng.random_range(0.0..0.15);
    let (lx, ly) = (light_angle.cos(), light_angle.sin());
    let extent = (w * w + h * h) as f32;
    let extent = extent.sqrt();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);

    // Texture value t in 0..1 at pixel (x, y), given the pixel's coordinate `along` the texture direction. The match
    // stays outside the pixel loop: one loop per texture, so the optimiser cannot hoist one texture's arithmetic on
    // another's (unset) parameters above the match, which valgrind's memcheck reports as a branch on uninitialised
    // memory (harmless, but noise that would hide a real report).
    let fill = |canvas: &mut Canvas, texture: &dyn Fn(usize, usize, f32) -> f32| {
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let along = fx * dx + fy * dy;
                let t = texture(x, y, along);
                let light = 1.0 + light_amp * 2.0 * (fx * lx + fy * ly) / extent;
                let c = lerp3(c1, c2, t);
                canvas.rgb[y * w + x] = [c[0] * light, c[1] * light, c[2] * light];
            }
        }
    };
    match rng.random_range(0..3) {
        0 => fill(canvas, &|_, _, along| (along / extent + 0.5).clamp(0.0, 1.0)),
        1 => {
            let period: f32 = rng.random_range(6.0..24.0);
            let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            fill(canvas, &|_, _, along| {
                0.5 + 0.5 * (along * std::f32::consts::TAU / period + phase).sin()
            });
        }
        _ => {
            // Blotches: value noise on a grid of `cell`-pixel squares, smoothly interpolated.
            let cell: f32 = rng.random_range(8.0..24.0);
            let cols = (w as f32 / cell) as usize + 2;
            let rows = (h as f32 / cell) as usize + 2;
            let grid: Vec<f32> = (0..cols * rows).map(|_| rng.random_range(0.0..1.0)).collect();
            fill(canvas, &|x, y, _| {
                let (gx, gy) = (x as f32 / cell, y as f32 / cell);
                let (ix, iy) = (gx as usize, gy as usize);
                let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
                let (tx, ty) = (smooth(gx - ix as f32), smooth(gy - iy as f32));
                let at = |i: usize, j: usize| grid[j * cols + i];
                let top = at(ix, iy) + (at(ix + 1, iy) - at(ix, iy)) * tx;
                let bottom = at(ix, iy + 1) + (at(ix + 1, iy + 1) - at(ix, iy + 1)) * tx;
                top + (bottom - top) * ty
            });
        }
    }
}

/// Paint shape `class` with bounding `radius` centred at (`cx`, `cy`) into the image and the labels.
fn paint_shape(plan: &Plan, canvas: &mut Canvas, class: usize, cx: f32, cy: f32, radius: f32, rng: &mut ChaCha8Rng) {
    let hb = plan.half_border;
    let kind = SHAPE_KINDS[(class - 1) % SHAPE_KINDS.len()];
    let geom = make_geom(kind, radius, hb + 1.5, rng);
    let hue = class_hue(class as u32, plan.num_classes as u32) + rng.random_range(-1.0..=1.0) * plan.hue_jitter;
    let base = hsv_to_rgb(hue, rng.random_range(0.6..1.0), rng.random_range(0.6..1.0));
    let shade_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let shade_amp: f32 = rng.random_range(0.0..0.2);
    let (sx, sy) = (
        shade_angle.cos() * shade_amp / radius,
        shade_angle.sin() * shade_amp / radius,
    );

    let reach = radius + hb + 2.0;
    let x0 = (cx - reach).floor().max(0.0) as usize;
    let y0 = (cy - reach).floor().max(0.0) as usize;
    let x1 = ((cx + reach).ceil().max(0.0) as usize).min(canvas.width);
    let y1 = ((cy + reach).ceil().max(0.0) as usize).min(canvas.height);
    let label = class as u8;
    for y in y0..y1 {
        for x in x0..x1 {
            let (fx, fy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let d = geom.sdf(fx, fy);
            let p = y * canvas.width + x;
            let coverage = (0.5 - d).clamp(0.0, 1.0);
            if coverage > 0.0 {
                let shade = 1.0 + fx * sx + fy * sy;
                let old = canvas.rgb[p];
                let mut new = [0.0; 3];
                for c in 0..3 {
                    new[c] = old[c] + (base[c] * shade - old[c]) * coverage;
                }
                canvas.rgb[p] = new;
            }
            if d < -hb {
                canvas.labels[p] = label;
            } else if hb > 0.0 && d <= hb {
                canvas.labels[p] = IGNORE_LABEL;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;

    fn hue_of(rgb: [f32; 3]) -> (f32, f32) {
        let max = rgb[0].max(rgb[1]).max(rgb[2]);
        let min = rgb[0].min(rgb[1]).min(rgb[2]);
        let d = max - min;
        let sat = if max > 0.0 { d / max } else { 0.0 };
        if d == 0.0 {
            return (0.0, sat);
        }
        let h = if max == rgb[0] {
            60.0 * ((rgb[1] - rgb[2]) / d).rem_euclid(6.0)
        } else if max == rgb[1] {
            60.0 * ((rgb[2] - rgb[0]) / d + 2.0)
        } else {
            60.0 * ((rgb[0] - rgb[1]) / d + 4.0)
        };
        (h, sat)
    }

    fn hue_distance(a: f32, b: f32) -> f32 {
        let d = (a - b).rem_euclid(360.0);
        d.min(360.0 - d)
    }

    #[test]
    fn image_and_annotation_agree_pixel_for_pixel() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            num_classes: 7,
            // No ignore band: the label edge itself must match the painted edge (a 1 px shift fails this test).
            border: 0,
            train_count: 12,
            validation_count: 6,
            ..opts(tmp.path())
        };
        generate(&o).unwrap();
        // Per class: pixels whose decoded colour has the class hue (±30°) and is saturated, and all pixels.
        let mut good = [0u64; 7];
        let mut total = [0u64; 7];
        let mut saturated_background = 0u64;
        for name in names(&tmp.path().join("train")) {
            let stem = name.strip_suffix(".jpg").unwrap();
            let img = image::open(tmp.path().join("train").join(&name)).unwrap().to_rgb8();
            let (_, _, _, _, _, raw) = read_png_raw(&tmp.path().join(format!("train_annotation/{stem}.png")));
            for (px, &label) in img.pixels().zip(&raw) {
                if label == 255 {
                    continue;
                }
                let (hue, sat) = hue_of([px[0] as f32, px[1] as f32, px[2] as f32]);
                total[label as usize] += 1;
                if label == 0 {
                    saturated_background += (sat > 0.55) as u64;
                } else if sat > 0.35 && hue_distance(hue, class_hue(label as u32, 7)) < 30.0 {
                    good[label as usize] += 1;
                }
            }
        }
        for class in 1..7 {
            let share = good[class] as f64 / total[class] as f64;
            assert!(
                share > 0.99,
                "class {class}: only {share:.3} of its pixels have its hue"
            );
        }
        let share = saturated_background as f64 / total[0] as f64;
        assert!(share < 0.02, "background is muted, but {share:.3} of it is saturated");
    }

    #[test]
    fn different_classes_never_touch_without_an_ignore_band() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            num_classes: 7,
            border: 2,
            ..small(tmp.path())
        };
        generate(&o).unwrap();
        let check = |raw: &[u8], w: usize, h: usize| {
            let mut touching = 0;
            for y in 0..h {
                for x in 0..w {
                    let a = raw[y * w + x];
                    for (nx, ny) in [(x + 1, y), (x, y + 1)] {
                        if nx < w && ny < h {
                            let b = raw[ny * w + nx];
                            touching += (a != b && a != 255 && b != 255) as usize;
                        }
                    }
                }
            }
            touching
        };
        let dir = tmp.path().join("train_annotation");
        for name in names(&dir) {
            let (_, _, _, w, h, raw) = read_png_raw(&dir.join(&name));
            assert_eq!(check(&raw, w as usize, h as usize), 0, "{name}");
        }
        // Without a border, classes do touch.
        let tmp = tempfile::tempdir().unwrap();
        generate(&SynthOptions { border: 0, ..o.clone() }.with_out(tmp.path())).unwrap();
        let dir = tmp.path().join("train_annotation");
        let mut touching = 0;
        for name in names(&dir) {
            let (_, _, _, w, h, raw) = read_png_raw(&dir.join(&name));
            assert!(!raw.contains(&255), "border 0 writes no ignore pixels ({name})");
            touching += check(&raw, w as usize, h as usize);
        }
        assert!(touching > 100);
    }
}

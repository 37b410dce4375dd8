//! Data-loader throughput: images/s (and per core) decoding VOC-like JPEG + palette PNG pairs and applying the
//! training transform at crop 480, base 520. Run with `cargo bench --bench loader`.
//!
//! The machine may be shared: `images_per_cpu_second` (images / process CPU seconds, from /proc) is the
//! per-core figure that does not depend on other load; `images_per_s_per_core` is wall-clock images/s / workers.
//!
//! Output lines are `key=value` pairs, one measurement per line, e.g.
//! `loader mode=train workers=2 batch=8 images=96 seconds=1.234 images_per_s=77.8 images_per_s_per_core=38.9`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use semseg::data::annotation::read_annotation;
use semseg::data::augment::train_transform;
use semseg::data::dataset::SamplePair;
use semseg::data::image_io::read_rgb;
use semseg::data::label_map::LabelLut;
use semseg::data::loader::{sample_rng, Loader, LoaderConfig, Mode};

const PAIRS: usize = 32;
const BASE: u32 = 520;
const CROP: u32 = 480;

/// A VOC-like pair: smooth background gradient, a few objects with texture, JPEG noise; labels with 255 borders.
fn make_pair(rng: &mut ChaCha8Rng, w: u32, h: u32) -> (RgbImage, GrayImage) {
    let bg = [
        rng.random_range(40..200u32),
        rng.random_range(40..200),
        rng.random_range(40..200),
    ];
    let mut img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            ((bg[0] + x / 8) % 256) as u8,
            ((bg[1] + y / 6) % 256) as u8,
            ((bg[2] + (x + y) / 10) % 256) as u8,
        ])
    });
    let mut lab = GrayImage::new(w, h);
    for _ in 0..rng.random_range(2..6) {
        let class = rng.random_range(1..21u8);
        let colour = [
            rng.random_range(0..256u32),
            rng.random_range(0..256),
            rng.random_range(0..256),
        ];
        let (cx, cy) = (rng.random_range(0..w) as f32, rng.random_range(0..h) as f32);
        let (rx, ry) = (
            rng.random_range(20..150) as f32,
            rng.random_range(20..120) as f32,
        );
        for y in 0..h {
            for x in 0..w {
                let d = ((x as f32 - cx) / rx).powi(2) + ((y as f32 - cy) / ry).powi(2);
                if d <= 1.0 {
                    let t = (x * 7 + y * 3) % 23;
                    img.put_pixel(x, y, Rgb(colour.map(|c| ((c + t) % 256) as u8)));
                    lab.put_pixel(x, y, Luma([if d > 0.92 { 255 } else { class }]));
                }
            }
        }
    }
    for p in img.pixels_mut() {
        for c in p.0.iter_mut() {
            *c = c.saturating_add(rng.random_range(0..12));
        }
    }
    (img, lab)
}

fn write_palette_png(path: &Path, label: &GrayImage) -> Result<(), Box<dyn std::error::Error>> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, label.width(), label.height());
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(
        (0..=255u8)
            .flat_map(|i| [i.wrapping_mul(41), i.wrapping_mul(89), i.wrapping_mul(13)])
            .collect::<Vec<u8>>(),
    );
    let mut w = enc.write_header()?;
    w.write_image_data(label.as_raw())?;
    Ok(())
}

/// CPU seconds used by this process so far (user + system, from /proc/self/stat; None elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of those.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// CPU milliseconds per item since `start` (as text; "n/a" without /proc).
fn cpu_ms_per(start: Option<f64>, items: usize) -> String {
    match (cpu_seconds(), start) {
        (Some(b), Some(a)) => format!("{:.2}", (b - a) * 1000.0 / items as f64),
        _ => "n/a".to_string(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut rng = ChaCha8Rng::seed_from_u64(2012);
    let mut pairs = Vec::new();
    let mut jpeg_bytes = 0;
    for i in 0..PAIRS {
        let (w, h) = if i % 4 == 3 { (375, 500) } else { (500, 375) };
        let (img, lab) = make_pair(&mut rng, w, h);
        let stem = format!("2007_{i:06}");
        let image = dir.path().join(format!("{stem}.jpg"));
        let annotation = dir.path().join(format!("{stem}.png"));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img)?;
        jpeg_bytes += out.len();
        std::fs::write(&image, out)?;
        write_palette_png(&annotation, &lab)?;
        pairs.push(SamplePair {
            stem,
            image,
            annotation,
        });
    }
    let samples: Arc<[SamplePair]> = pairs.into();
    let lut = Arc::new(LabelLut::identity());
    println!(
        "# {PAIRS} pairs, 500x375 / 375x500, mean JPEG size {} KB",
        jpeg_bytes / PAIRS / 1024
    );

    // Per-stage cost on one thread.
    let reps = 3;
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let mut decoded = Vec::new();
    for _ in 0..reps {
        decoded.clear();
        for p in samples.iter() {
            decoded.push((read_rgb(&p.image)?, read_annotation(&p.annotation)?));
        }
    }
    let decode_ms = t.elapsed().as_secs_f64() * 1000.0 / (reps * PAIRS) as f64;
    let decode_cpu = cpu_ms_per(cpu0, reps * PAIRS);
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    for r in 0..reps {
        for (i, (img, lab)) in decoded.iter().enumerate() {
            let mut rng = sample_rng(1, r as u64, i);
            std::hint::black_box(train_transform(img, lab, BASE, CROP, &mut rng)?);
        }
    }
    let transform_ms = t.elapsed().as_secs_f64() * 1000.0 / (reps * PAIRS) as f64;
    let transform_cpu = cpu_ms_per(cpu0, reps * PAIRS);
    println!("stage=decode ms_per_image={decode_ms:.2} cpu_ms_per_image={decode_cpu}");
    println!("stage=transform ms_per_image={transform_ms:.2} cpu_ms_per_image={transform_cpu}");

    for workers in [1usize, 2] {
        let cfg = LoaderConfig {
            batch_size: 8,
            workers,
            queue_depth: 2,
            mode: Mode::Train,
            shuffle: true,
            drop_last: true,
            seed: 1,
            base_size: BASE,
            crop_size: CROP,
            max_pixels: semseg::data::image_io::DEFAULT_MAX_PIXELS,
        };
        let epochs = 3;
        let cpu0 = cpu_seconds();
        let t = Instant::now();
        let mut images = 0;
        for epoch in 0..epochs {
            for batch in Loader::spawn(samples.clone(), lut.clone(), cfg.clone(), epoch)? {
                images += std::hint::black_box(batch?).n;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
        let ips = images as f64 / secs;
        let per_cpu = cpu.map_or("n/a".to_string(), |c| {
            format!("{:.1}", images as f64 / c.max(1e-9))
        });
        println!(
            "loader mode=train crop={CROP} base={BASE} workers={workers} batch=8 images={images} seconds={secs:.3} \
             images_per_s={ips:.1} images_per_s_per_core={:.1} images_per_cpu_second={per_cpu}",
            ips / workers as f64
        );
    }
    Ok(())
}

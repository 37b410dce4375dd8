//! The transformed inputs of one product, `V[ξ]`, copied from tile-major (`[tile][c]`, as the input transform
//! writes them: its lanes are channels) to channel-major (`[c][tile]`) before the gemm crate's product reads them.
//!
//! The product `M[ξ] = U[ξ] · V[ξ]` writes `M` row-major, so the gemm crate computes it transposed, with `V[ξ]ᵀ`
//! as its packed operand; from the tile-major layout it packs that with one scalar load per value (64 values a
//! step, `cc` floats apart). Measured 2026-12-06 on 2 Zen 4 threads, ASPP's dilation-24 conv (`bench_conv 2048 64
//! 64 256 3 1 24 24 --keep`, 76–78 ms): that packing was 8–9% of the samples. Channel-major, each packed run is 64
//! contiguous floats; the copy here moves 16 × 16 blocks through registers ([`super::x86::transpose_16`]), into a
//! buffer of each thread (at most a few MB: one chunk's `V[ξ]`). With it the copy and the packing took 5 + 1.6%;
//! eight Winograd convolutions of DeepLabV3 alone, three alternating rounds: 267 / 285 / 271 → 274 / 261 / 269 ms
//! summed (the host's noise is as large as the change; whole networks did not move beyond it).
//!
//! Only where it pays: AVX-512 (the blocks' transpose) and f32 products on the gemm crate. The bf16 products pack
//! their operands themselves, and AVX2 CPUs run row-major right-hand operands on [`super::super::gemm_f32`],
//! whose packing of the tile-major `V` was measured no slower.

use std::cell::RefCell;

use super::{aligned, padded_row, LANES};

thread_local! {
    /// One product's `V[ξ]`, channel-major; reused by every product a thread runs.
    static BY_CHANNEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether the products read `V` channel-major (see the module docs), checked once per call.
pub(super) fn pays() -> bool {
    super::avx512() && !crate::model::precision::bf16_products()
}

/// Runs `product` on `v` (`[t, cc]`, tile-major) copied channel-major into this thread's buffer: `product` gets the
/// copy and its row stride (`[cc, t]`, rows `row_stride` apart).
pub(super) fn with_channel_major<R>(v: &[f32], t: usize, cc: usize, product: impl FnOnce(&[f32], usize) -> R) -> R {
    // Rows a whole number of vectors plus one cache line, so they are not a multiple of 4 KiB apart.
    let row_stride = padded_row(t.next_multiple_of(LANES));
    let run = |buffer: &mut Vec<f32>| {
        let by_channel = aligned(buffer, cc * row_stride);
        transpose(v, t, cc, by_channel, row_stride);
        product(by_channel, row_stride)
    };
    BY_CHANNEL.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buffer) => run(&mut buffer),
        // Only if a product ever ran another on the same thread (the gemm crate's single-threaded products do
        // not): a buffer of its own.
        Err(_) => run(&mut Vec::new()),
    })
}

/// `out[c · row_stride + tile] = v[tile · cc + c]` for every tile < `t` and channel < `cc` (the rest of each row of
/// `out` is left as it was).
pub(super) fn transpose(v: &[f32], t: usize, cc: usize, out: &mut [f32], row_stride: usize) {
    assert!(
        v.len() >= t * cc,
        "transpose: v holds {} values, not {t} × {cc}",
        v.len()
    );
    assert!(row_stride >= t, "transpose: rows of {row_stride} for {t} tiles");
    assert!(
        cc == 0 || out.len() >= (cc - 1) * row_stride + t,
        "transpose: out holds {} values",
        out.len()
    );
    // Whole 16 × 16 blocks through registers; the edges one value at a time.
    let (full_t, full_c) = full_blocks(v, t, cc, out, row_stride);
    for c in 0..cc {
        let row = &mut out[c * row_stride..];
        let tiles_done = if c < full_c { full_t } else { 0 };
        for tile in tiles_done..t {
            row[tile] = v[tile * cc + c];
        }
    }
}

/// The whole 16 × 16 blocks of [`transpose`] where the CPU has AVX-512; returns how many tiles and channels they
/// covered (none elsewhere).
#[cfg(target_arch = "x86_64")]
fn full_blocks(v: &[f32], t: usize, cc: usize, out: &mut [f32], row_stride: usize) -> (usize, usize) {
    if super::avx512() {
        // SAFETY: AVX-512F is present (checked here); the caller asserted the lengths.
        unsafe { blocks_avx512(v, t, cc, out, row_stride) }
    } else {
        (0, 0)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn full_blocks(_: &[f32], _: usize, _: usize, _: &mut [f32], _: usize) -> (usize, usize) {
    (0, 0)
}

/// [`full_blocks`] on AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F; the lengths as [`transpose`] asserts them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn blocks_avx512(v: &[f32], t: usize, cc: usize, out: &mut [f32], row_stride: usize) -> (usize, usize) {
    use std::arch::x86_64::*;
    let (full_t, full_c) = (t / LANES * LANES, cc / LANES * LANES);
    // Tiles outermost: each block reads 16 rows of `v` onwards, which the prefetchers follow.
    for t0 in (0..full_t).step_by(LANES) {
        for c0 in (0..full_c).step_by(LANES) {
            let mut rows = [_mm512_setzero_ps(); LANES];
            for (i, row) in rows.iter_mut().enumerate() {
                // SAFETY: tile t0 + i < t and channels c0 .. c0 + 16 ≤ cc: inside v.
                *row = unsafe { _mm512_loadu_ps(v.as_ptr().add((t0 + i) * cc + c0)) };
            }
            for (j, column) in super::x86::transpose_16(rows).into_iter().enumerate() {
                // SAFETY: channel c0 + j < cc, tiles t0 .. t0 + 16 ≤ t ≤ row_stride: inside out.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((c0 + j) * row_stride + t0), column) };
            }
        }
    }
    (full_t, full_c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_value_channel_major_at_any_size() {
        for (t, cc) in [
            (1usize, 1usize),
            (16, 16),
            (17, 16),
            (16, 33),
            (40, 48),
            (121, 20),
            (3, 70),
        ] {
            let v: Vec<f32> = (0..t * cc).map(|i| i as f32 * 0.5 - 7.0).collect();
            let row_stride = padded_row(t.next_multiple_of(LANES));
            let mut out = vec![f32::NAN; cc * row_stride];
            transpose(&v, t, cc, &mut out, row_stride);
            for c in 0..cc {
                for tile in 0..t {
                    assert_eq!(
                        out[c * row_stride + tile],
                        v[tile * cc + c],
                        "t {t}, cc {cc}: ({c}, {tile})"
                    );
                }
                // Beyond the tiles, the row is left alone.
                assert!(out[c * row_stride + t..(c + 1) * row_stride].iter().all(|x| x.is_nan()));
            }
        }
    }

    #[test]
    fn hands_the_product_a_channel_major_copy() {
        let (t, cc) = (35, 24);
        let v: Vec<f32> = (0..t * cc).map(|i| (i % 97) as f32).collect();
        let sum = with_channel_major(&v, t, cc, |by_channel, row_stride| {
            assert!(row_stride >= t && row_stride % LANES == 0);
            assert_eq!(by_channel.as_ptr() as usize % 64, 0, "rows start on a cache line");
            (0..cc)
                .map(|c| by_channel[c * row_stride..c * row_stride + t].iter().sum::<f32>())
                .sum::<f32>()
        });
        assert_eq!(sum, v.iter().sum::<f32>());
    }
}

//! The shape kinds as geometry: each is a signed distance function around the shape's centre, so the image's
//! anti-aliased edge and the annotation's label / ignore band come from the same numbers.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The shape kinds, in class order (class `k ≥ 1` draws `SHAPE_KINDS[(k − 1) % 6]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeKind {
    Disc,
    Rectangle,
    Triangle,
    Ring,
    Ellipse,
    Cross,
}

/// Shape kind of each class, cycling for more than six shape classes.
pub const SHAPE_KINDS: [ShapeKind; 6] = [
    ShapeKind::Disc,
    ShapeKind::Rectangle,
    ShapeKind::Triangle,
    ShapeKind::Ring,
    ShapeKind::Ellipse,
    ShapeKind::Cross,
];

/// Geometry relative to the shape's centre; `sdf` < 0 inside.
pub(super) enum Geom {
    Disc { r: f32 },
    Ring { mid: f32, half_thickness: f32 },
    Ellipse { a: f32, b: f32, cos: f32, sin: f32 },
    Polygon(Vec<[f32; 2]>),
}

impl Geom {
    /// Signed distance (px) from the boundary: negative inside. Exact except for the ellipse (first-order
    /// approximation, exact on the boundary and along the axes).
    pub(super) fn sdf(&self, x: f32, y: f32) -> f32 {
        match self {
            Geom::Disc { r } => (x * x + y * y).sqrt() - r,
            Geom::Ring { mid, half_thickness } => ((x * x + y * y).sqrt() - mid).abs() - half_thickness,
            Geom::Ellipse { a, b, cos, sin } => {
                let (u, v) = (x * cos + y * sin, -x * sin + y * cos);
                let k0 = ((u / a).powi(2) + (v / b).powi(2)).sqrt();
                let k1 = ((u / (a * a)).powi(2) + (v / (b * b)).powi(2)).sqrt();
                if k1 == 0.0 {
                    -a.min(*b)
                } else {
                    k0 * (k0 - 1.0) / k1
                }
            }
            Geom::Polygon(v) => polygon_sdf(v, x, y),
        }
    }
}

/// Signed distance to a simple polygon (Inigo Quilez's `sdPolygon`): negative inside, any winding.
fn polygon_sdf(v: &[[f32; 2]], px: f32, py: f32) -> f32 {
    let sq = |x: f32, y: f32| x * x + y * y;
    let mut d = sq(px - v[0][0], py - v[0][1]);
    let mut s = 1.0f32;
    let mut j = v.len() - 1;
    for i in 0..v.len() {
        let (ex, ey) = (v[j][0] - v[i][0], v[j][1] - v[i][1]);
        let (wx, wy) = (px - v[i][0], py - v[i][1]);
        let t = ((wx * ex + wy * ey) / sq(ex, ey)).clamp(0.0, 1.0);
        d = d.min(sq(wx - ex * t, wy - ey * t));
        let c = [py >= v[i][1], py < v[j][1], ex * wy > ey * wx];
        if c.iter().all(|&b| b) || c.iter().all(|&b| !b) {
            s = -s;
        }
        j = i;
    }
    s * d.sqrt()
}

fn rotate(points: &[[f32; 2]], angle: f32) -> Vec<[f32; 2]> {
    let (sin, cos) = angle.sin_cos();
    points
        .iter()
        .map(|&[x, y]| [x * cos - y * sin, x * sin + y * cos])
        .collect()
}

/// Geometry of a `kind` fitting in a circle of `radius`, with an inscribed disc of at least `min_half` px.
pub(super) fn make_geom(kind: ShapeKind, radius: f32, min_half: f32, rng: &mut ChaCha8Rng) -> Geom {
    let angle = rng.random_range(0.0..std::f32::consts::TAU);
    match kind {
        ShapeKind::Disc => Geom::Disc { r: radius },
        ShapeKind::Rectangle => {
            let theta = rng.random_range(0.4..std::f32::consts::FRAC_PI_2 - 0.4);
            let (hx, hy) = (0.98 * radius * theta.cos(), 0.98 * radius * theta.sin());
            Geom::Polygon(rotate(&[[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]], angle))
        }
        ShapeKind::Triangle => {
            let points: Vec<[f32; 2]> = (0..3)
                .map(|k| {
                    let a = k as f32 * std::f32::consts::TAU / 3.0 + rng.random_range(-0.26..0.26);
                    let r = radius * rng.random_range(0.9..0.98);
                    [r * a.cos(), r * a.sin()]
                })
                .collect();
            Geom::Polygon(rotate(&points, angle))
        }
        ShapeKind::Ring => {
            let half_thickness = (radius * rng.random_range(0.12..0.22)).clamp(min_half, 0.4 * radius);
            Geom::Ring {
                mid: radius - half_thickness,
                half_thickness,
            }
        }
        ShapeKind::Ellipse => Geom::Ellipse {
            a: radius * rng.random_range(0.85..1.0),
            b: radius * rng.random_range(0.45..0.75),
            cos: angle.cos(),
            sin: angle.sin(),
        },
        ShapeKind::Cross => {
            let w = (radius * rng.random_range(0.2..0.3)).clamp(min_half, 0.4 * radius);
            let l = 0.98 * (radius * radius - w * w).sqrt();
            let points = [
                [-w, -l],
                [w, -l],
                [w, -w],
                [l, -w],
                [l, w],
                [w, w],
                [w, l],
                [-w, l],
                [-w, w],
                [-l, w],
                [-l, -w],
                [-w, -w],
            ];
            Geom::Polygon(rotate(&points, angle))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polygon_sdf_signs_and_distances() {
        let square = [[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]];
        assert!((polygon_sdf(&square, 0.0, 0.0) + 1.0).abs() < 1e-6);
        assert!((polygon_sdf(&square, 3.0, 0.0) - 2.0).abs() < 1e-6);
        let reversed: Vec<[f32; 2]> = square.iter().rev().copied().collect();
        assert!((polygon_sdf(&reversed, 0.0, 0.5) + 0.5).abs() < 1e-6);
    }
}

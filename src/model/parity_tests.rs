//! Layer-level parity with PyTorch: fixtures written by `scripts/make-parity-fixtures.py` (f32, seeded), compared
//! with relative L2 error ≤ 1e-5 — outputs, input gradients and BatchNorm running statistics.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::heads::deeplab::Aspp;
use super::heads::PspHead;
use super::layers::BatchNorm2d;
use super::ops::pool::{adaptive_avg_pool2d, max_pool_3x3_s2};
use super::ops::resize::resize_bilinear;
use super::resnet::{Block, BlockPlan};
use super::weights::load_into_varmap;

const TOL: f64 = 1e-5;

struct Fixture {
    name: &'static str,
    t: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &'static str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parity")
            .join(name);
        let t = candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/make-parity-fixtures.py)", path.display()));
        Self { name, t }
    }

    fn get(&self, key: &str) -> Tensor {
        self.t
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
            .clone()
    }

    /// The module's state dict (`m.*` without the prefix).
    fn params(&self) -> HashMap<String, Tensor> {
        self.t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("m.").map(|k| (k.to_string(), v.clone())))
            .collect()
    }

    fn vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.params(), DType::F32, &Device::Cpu)
    }

    /// A training-style module: built on a `VarMap` and loaded from the fixture by name, so running statistics
    /// can be read back after a training step.
    fn varmap_module<T>(&self, build: impl FnOnce(VarBuilder) -> Result<T>) -> (VarMap, T) {
        let vm = VarMap::new();
        let module = build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).expect("build");
        load_into_varmap(&vm, &self.params(), self.name, |n| Some(n.to_string())).expect("load fixture weights");
        (vm, module)
    }

    fn assert_close(&self, what: &str, got: &Tensor, key: &str) {
        let want = self.get(key);
        assert_eq!(got.dims(), want.dims(), "{}: {what} shape", self.name);
        let got = got.to_dtype(DType::F64).expect("f64");
        let want = want.to_dtype(DType::F64).expect("f64");
        let num = (&got - &want)
            .and_then(|d| d.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>())
            .expect("diff");
        let den = want
            .sqr()
            .and_then(|d| d.sum_all()?.sqrt()?.to_scalar::<f64>())
            .expect("norm");
        assert!(
            den > 0.0,
            "{}: {key} is all zeros, the comparison proves nothing",
            self.name
        );
        let rel = num / den;
        assert!(
            rel <= TOL,
            "{}: {what} vs {key}: relative L2 error {rel:e} > {TOL:e}",
            self.name
        );
    }

    /// Forward `f` on `in_key`, compare with `out_key`, then the input gradient for upstream `gout_key` with
    /// `grad_key`.
    fn check_with_grad(
        &self,
        in_key: &str,
        out_key: &str,
        gout_key: &str,
        grad_key: &str,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) {
        let x = Var::from_tensor(&self.get(in_key)).expect("var");
        let out = f(x.as_tensor()).expect("forward");
        self.assert_close("output", &out, out_key);
        let loss = (out * self.get(gout_key)).and_then(|l| l.sum_all()).expect("loss");
        let grads = loss.backward().expect("backward");
        let gx = grads.get(x.as_tensor()).expect("gradient reaches the input");
        self.assert_close("input gradient", gx, grad_key);
    }
}

#[test]
fn bilinear_resize_up_down_odd_sizes() {
    let f = Fixture::load("bilinear.safetensors");
    for (i, (h, w)) in [(11, 13), (3, 2), (4, 9), (7, 8), (1, 1)].into_iter().enumerate() {
        f.check_with_grad(
            "in.x",
            &format!("out.{i}"),
            &format!("gout.{i}"),
            &format!("grad.{i}"),
            |x| resize_bilinear(x, h, w),
        );
    }
}

#[test]
fn max_pool_and_adaptive_pool() {
    let f = Fixture::load("pool.safetensors");
    for i in 0..2 {
        f.check_with_grad(
            &format!("max.in.{i}"),
            &format!("max.out.{i}"),
            &format!("max.gout.{i}"),
            &format!("max.grad.{i}"),
            max_pool_3x3_s2,
        );
    }
    for (i, (h, w)) in [(1, 1), (2, 2), (3, 3), (6, 6), (2, 5)].into_iter().enumerate() {
        f.check_with_grad(
            "avg.in",
            &format!("avg.out.{i}"),
            &format!("avg.gout.{i}"),
            &format!("avg.grad.{i}"),
            |x| adaptive_avg_pool2d(x, h, w),
        );
    }
}

/// Eval output, then one training step: output, input gradient and the updated running statistics.
fn check_train_and_eval<M: ModuleT>(f: &Fixture, build: impl FnOnce(VarBuilder) -> Result<M>) {
    let (vm, module) = f.varmap_module(build);
    let x = f.get("in.x");
    f.assert_close("eval output", &module.forward_t(&x, false).expect("eval"), "out.eval");
    f.check_with_grad("in.x", "out.train", "gout.train", "grad.train", |x| {
        module.forward_t(x, true)
    });
    let data = vm.data().lock().expect("varmap");
    let mut checked = 0;
    for key in f.t.keys().filter_map(|k| k.strip_prefix("after.")) {
        let var = data.get(key).unwrap_or_else(|| panic!("{}: no variable {key}", f.name));
        f.assert_close("running statistic", var.as_tensor(), &format!("after.{key}"));
        checked += 1;
    }
    assert!(checked >= 2, "{}: no running statistics compared", f.name);
}

#[test]
fn batchnorm_train_and_eval() {
    check_train_and_eval(&Fixture::load("batchnorm.safetensors"), |vb| BatchNorm2d::new(6, vb));
}

/// torchvision's `Bottleneck(in_ch, planes, stride, downsample, dilation=dilation)` with its downsample.
fn bottleneck_with_downsample(in_ch: usize, planes: usize, stride: usize, dilation: usize) -> BlockPlan {
    BlockPlan {
        layer: 1,
        index: 0,
        bottleneck: true,
        in_ch,
        planes,
        stride,
        dilation,
        has_downsample: true,
    }
}

#[test]
fn bottleneck_with_dilation() {
    check_train_and_eval(&Fixture::load("bottleneck_dilated.safetensors"), |vb| {
        Block::new(&bottleneck_with_downsample(16, 4, 1, 2), vb)
    });
}

#[test]
fn bottleneck_stride2_odd_even_input() {
    check_train_and_eval(&Fixture::load("bottleneck_stride2.safetensors"), |vb| {
        Block::new(&bottleneck_with_downsample(16, 8, 2, 1), vb)
    });
}

#[test]
fn aspp_with_image_pooling() {
    let f = Fixture::load("aspp.safetensors");
    let aspp = Aspp::new(8, 16, [2, 3, 5], f.vb()).expect("build");
    f.assert_close(
        "eval output",
        &aspp.forward_t(&f.get("in.x"), false).expect("forward"),
        "out.eval",
    );
    let folded = aspp.fold().expect("fold");
    f.assert_close(
        "folded output",
        &folded.forward_t(&f.get("in.x"), false).expect("forward"),
        "out.eval",
    );
}

#[test]
fn psp_head_bins_not_dividing_the_map() {
    let f = Fixture::load("psp.safetensors");
    let head = PspHead::new(16, 5, f.vb()).expect("build");
    f.assert_close(
        "eval output",
        &head.forward_t(&f.get("in.x"), false).expect("forward"),
        "out.eval",
    );
    let folded = head.fold().expect("fold");
    f.assert_close(
        "folded output",
        &folded.forward_t(&f.get("in.x"), false).expect("forward"),
        "out.eval",
    );
}

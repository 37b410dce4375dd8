//! Segmentation heads: layer4 features → class logits at feature resolution.
//!
//! One file per head, each naming its parameters as torchvision's module (`classifier.*`, `aux_classifier.*`).
//! A new head is a new file and one more [`Head`] variant.

pub mod deeplab;
pub mod fcn;
pub mod psp;

use candle_core::{Result, Tensor};

pub use deeplab::DeepLabHead;
pub use fcn::FcnHead;
pub use psp::PspHead;

/// The main head, chosen by [`crate::model::Algorithm`].
#[derive(Clone, Debug)]
pub enum Head {
    Fcn(FcnHead),
    Deeplab(Box<DeepLabHead>),
    Psp(PspHead),
}

impl Head {
    /// `[B, Cin, h, w]` → `[B, num_classes, h, w]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Head::Fcn(h) => h.forward_t(x, train),
            Head::Deeplab(h) => h.forward_t(x, train),
            Head::Psp(h) => h.forward_t(x, train),
        }
    }

    pub fn fold(&self) -> Result<Self> {
        Ok(match self {
            Head::Fcn(h) => Head::Fcn(h.fold()?),
            Head::Deeplab(h) => Head::Deeplab(Box::new(h.fold()?)),
            Head::Psp(h) => Head::Psp(h.fold()?),
        })
    }
}

//! The training job: [`inputs`] prepares and validates everything the job reads before any training starts;
//! [`job`] runs the loop (start or resume, one epoch, end of epoch) from the pieces [`loss`], [`optim`], [`schedule`],
//! [`validation`], [`metrics`], [`early_stopping`], [`checkpoint`] and [`report`]; the start weights come from
//! [`incremental`] (an earlier model) or [`pretrained`] (ImageNet backbone weights).

pub(crate) mod batch_upload;
pub mod checkpoint;
pub mod early_stopping;
mod fused_sgd;
pub mod incremental;
pub mod inputs;
pub mod job;
pub mod loss;
pub mod memory_check;
pub mod metrics;
pub mod optim;
pub mod pretrained;
pub mod report;
pub mod schedule;
pub mod validation;

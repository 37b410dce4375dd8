//! The training job: [`inputs`] prepares and validates everything the job reads before any training starts;
//! [`job`] runs the loop from the pieces [`loss`], [`optim`], [`schedule`], [`metrics`], [`early_stopping`],
//! [`checkpoint`] and [`incremental`].

pub mod checkpoint;
pub mod early_stopping;
mod fused_sgd;
pub mod incremental;
pub mod inputs;
pub mod job;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod schedule;

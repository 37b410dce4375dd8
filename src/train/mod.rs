//! The training job: [`inputs`] prepares and validates everything the job reads before any training starts;
//! [`optim`], [`schedule`], [`metrics`] and [`early_stopping`] are the pieces of the loop.

pub mod early_stopping;
pub mod inputs;
pub mod metrics;
pub mod optim;
pub mod schedule;

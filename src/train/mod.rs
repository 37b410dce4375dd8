//! The training job: [`inputs`] prepares and validates everything the job reads before any training starts.

pub mod inputs;

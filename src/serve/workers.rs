//! A bounded pool of inference worker threads, off the async runtime.
//!
//! `workers` OS threads take jobs from a queue of at most `queue` waiting jobs; [`WorkerPool::try_submit`] fails at
//! once when the queue is full (the caller answers 503), so memory and latency stay bounded under any load. A job
//! whose caller has gone away (timed out, disconnected) before a worker picks it up is skipped. A panicking job is
//! caught and reported to its caller; the worker carries on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::panics;

type Job = Box<dyn FnOnce() + Send>;

/// A job's result, or the panic message if it panicked.
pub type JobResult<T> = Result<T, String>;

/// The queue is full (or the pool is shutting down).
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Closed,
}

#[derive(Debug)]
pub struct WorkerPool {
    sender: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    queued: Arc<AtomicUsize>,
    busy: Arc<AtomicUsize>,
    workers: usize,
}

impl WorkerPool {
    /// Start `workers` threads (at least 1) sharing a queue of `queue` waiting jobs (at least 1).
    pub fn new(workers: usize, queue: usize) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let (sender, receiver) = mpsc::sync_channel::<Job>(queue.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let queued = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let receiver = Arc::clone(&receiver);
            let queued = Arc::clone(&queued);
            let busy = Arc::clone(&busy);
            let thread = std::thread::Builder::new()
                .name(format!("inference-{i}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job, never while running one.
                    let job = match receiver.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    let Ok(job) = job else { break };
                    queued.fetch_sub(1, Ordering::SeqCst);
                    busy.fetch_add(1, Ordering::SeqCst);
                    job();
                    busy.fetch_sub(1, Ordering::SeqCst);
                })?;
            threads.push(thread);
        }
        Ok(Self {
            sender: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
            queued,
            busy,
            workers,
        })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Jobs running now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Queue `work`; the receiver gets its result (or its panic message). Fails at once if the queue is full.
    pub fn try_submit<T, F>(&self, work: F) -> Result<oneshot::Receiver<JobResult<T>>, SubmitError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                tracing::debug!("skipping a job whose request has gone");
                return;
            }
            let result = catch_unwind(AssertUnwindSafe(work)).map_err(panics::message);
            // The request may have timed out meanwhile; then nobody wants the result.
            let _ = tx.send(result);
        });
        let guard = match self.sender.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(sender) = guard.as_ref() else {
            return Err(SubmitError::Closed);
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        match sender.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Full,
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Stop taking jobs, let the workers finish the queued ones, and wait for them (blocking).
    pub fn shutdown(&self) {
        let sender = match self.sender.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(sender);
        let threads = match self.threads.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("an inference worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn runs_jobs_and_bounds_the_queue() -> anyhow::Result<()> {
        let pool = WorkerPool::new(1, 1)?;
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let first = pool
            .try_submit(move || release_rx.recv_timeout(Duration::from_secs(10)).is_ok())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // Wait until the worker holds the first job, then fill the one queue slot.
        while pool.busy() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = pool.try_submit(|| 2).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(pool.try_submit(|| 3).err(), Some(SubmitError::Full));
        release_tx.send(())?;
        assert_eq!(first.await?, Ok(true));
        assert_eq!(second.await?, Ok(2));
        pool.shutdown();
        assert_eq!(pool.try_submit(|| 4).err(), Some(SubmitError::Closed));
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_job_is_reported_and_the_worker_survives() -> anyhow::Result<()> {
        let pool = WorkerPool::new(1, 4)?;
        let rx = pool
            .try_submit(|| -> u8 { panic!("boom") })
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(rx.await?, Err("boom".to_string()));
        let rx = pool.try_submit(|| 7u8).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(rx.await?, Ok(7));
        pool.shutdown();
        Ok(())
    }
}

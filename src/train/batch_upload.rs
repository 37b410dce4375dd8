//! A training batch's arrays onto the training device without making the host wait for the device.
//!
//! On the CPU the loader's vectors become tensors as they are. On a GPU, a copy from ordinary (pageable) host
//! memory goes through the driver's own staging buffers, and CUDA documents such an "asynchronous" copy as possibly
//! synchronous: for a batch of tens of MB the driver may wait for the work already queued on the stream before its
//! staging buffers free up, so the host could not queue step k + 1 while the GPU ran step k, and the GPU would idle
//! while each batch crossed (not measured here: no GPU). Here each kind of array (an [`Upload`] each) goes through
//! two page-locked (pinned) staging buffers in turn: the copy is queued on the device's stream and the host
//! returns at once. A buffer is written again only once the copy that last read it has completed (an event
//! recorded after it), two uploads later, so the host stays at most about a step ahead. If pinned memory cannot be
//! had, uploads fall back to the pageable path for the rest of the job (logged once).

use std::marker::PhantomData;

use candle_core::{Device, Result, Shape, Tensor, WithDType};

/// What an [`Upload`] carries: the element types of a batch (images f32, class indices u32).
#[cfg(feature = "cuda")]
pub trait Element:
    WithDType + candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits
{
}
/// What an [`Upload`] carries: the element types of a batch (images f32, class indices u32).
#[cfg(not(feature = "cuda"))]
pub trait Element: WithDType {}

impl Element for f32 {}
impl Element for u32 {}

/// Uploads one kind of array, once a step: each kind needs its own, since a staging buffer is reused two uploads
/// later.
pub struct Upload<T: Element> {
    /// What the log calls it.
    what: &'static str,
    #[cfg(feature = "cuda")]
    staging: cuda::Staging<T>,
    /// Set when pinned memory failed: pageable uploads from then on.
    #[cfg(feature = "cuda")]
    pageable: bool,
    _element: PhantomData<T>,
}

impl<T: Element> Upload<T> {
    /// No memory is taken until the first upload to a GPU.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            #[cfg(feature = "cuda")]
            staging: cuda::Staging::new(),
            #[cfg(feature = "cuda")]
            pageable: false,
            _element: PhantomData,
        }
    }

    /// `data` as a tensor of `shape` on `device`.
    pub fn tensor(&mut self, data: Vec<T>, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            candle_core::bail!("uploading the {}: {} values for shape {shape:?}", self.what, data.len())
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            if !self.pageable {
                match self.staging.upload(dev, &data) {
                    Ok(slice) => {
                        let storage = candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(slice, dev.clone());
                        return Ok(Tensor::from_storage(
                            candle_core::Storage::Cuda(storage),
                            shape,
                            candle_core::op::BackpropOp::none(),
                            false,
                        ));
                    }
                    Err(error) => {
                        tracing::warn!(
                            what = self.what,
                            %error,
                            "pinned host memory failed: batches go up from pageable memory (the host waits for \
                             the GPU before each)"
                        );
                        self.pageable = true;
                    }
                }
            }
        }
        Tensor::from_vec(data, shape, device)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::Result;
    use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};

    /// Staging buffers per kind of array: enough that the host, writing one, never waits for the copy it just
    /// queued from the other.
    const SLOTS: usize = 2;

    pub struct Staging<T> {
        slots: [Option<Slot<T>>; SLOTS],
        next: usize,
    }

    /// A pinned buffer and the event recorded after the last copy that reads it.
    struct Slot<T> {
        host: PinnedHostSlice<T>,
        copied: CudaEvent,
    }

    impl<T> Drop for Slot<T> {
        fn drop(&mut self) {
            // The buffer must outlive the copy that reads it.
            let _ = self.copied.synchronize();
        }
    }

    impl<T: super::Element> Staging<T> {
        pub fn new() -> Self {
            Self {
                slots: std::array::from_fn(|_| None),
                next: 0,
            }
        }

        /// `data` in a new device buffer, copied through the next staging buffer; the copy is queued, not waited
        /// for.
        pub fn upload(&mut self, dev: &CudaDevice, data: &[T]) -> Result<CudaSlice<T>> {
            let stream = dev.cuda_stream();
            let slot = &mut self.slots[self.next];
            self.next = (self.next + 1) % SLOTS;
            if slot.as_ref().is_none_or(|s| s.host.len() < data.len()) {
                // The old buffer (if any) is dropped first, once its last copy has completed.
                *slot = None;
                let context = stream.context();
                // SAFETY: the buffer is written below before any copy reads it.
                let host = unsafe { context.alloc_pinned::<T>(data.len()) }.w()?;
                let copied = context.new_event(None).w()?;
                *slot = Some(Slot { host, copied });
            }
            let Some(slot) = slot.as_mut() else {
                candle_core::bail!("staging buffer missing after its allocation")
            };
            // The copy that last read this buffer (two uploads ago) has completed before it is overwritten.
            slot.copied.synchronize().w()?;
            // (cudarc's own event on the buffer is recorded only on multi-stream contexts, so this waits for none.)
            let host = &mut slot.host.as_mut_slice().w()?[..data.len()];
            host.copy_from_slice(data);
            // SAFETY: the copy below writes every element before any later work on the stream reads it.
            let mut device = unsafe { dev.alloc::<T>(data.len()) }?;
            stream.memcpy_htod(&*host, &mut device).w()?;
            slot.copied.record(&stream).w()?;
            Ok(device)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_cpu_the_vector_becomes_the_tensor() -> Result<()> {
        let mut images = Upload::<f32>::new("images");
        let t = images.tensor(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (1, 2, 3), &Device::Cpu)?;
        assert_eq!(t.dims(), [1, 2, 3]);
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut labels = Upload::<u32>::new("labels");
        assert_eq!(labels.tensor(vec![7, 8], 2, &Device::Cpu)?.to_vec1::<u32>()?, [7, 8]);
        Ok(())
    }

    #[test]
    fn a_length_that_does_not_fit_the_shape_is_refused() {
        let mut images = Upload::<f32>::new("images");
        let err = images.tensor(vec![1.0; 5], (2, 3), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("uploading the images: 5 values"), "{err}");
    }
}

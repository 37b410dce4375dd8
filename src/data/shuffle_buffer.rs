//! Shuffling a stream in bounded memory: hold up to `capacity` items; once full, every arrival sends out a
//! uniformly chosen held item and takes its place; at the end the rest leave in random order. A stream no longer than
//! the capacity comes out as a uniformly random permutation; a longer one is mixed within a window of that size
//! (as TensorFlow's `shuffle(buffer_size)` and SageMaker's ShuffleConfig do).

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A seeded, bounded shuffle buffer.
#[derive(Debug)]
pub struct ShuffleBuffer<T> {
    held: Vec<T>,
    capacity: usize,
    rng: ChaCha8Rng,
}

impl<T> ShuffleBuffer<T> {
    /// A capacity of 0 or 1 keeps the stream's order.
    pub fn new(capacity: usize, rng: ChaCha8Rng) -> Self {
        Self {
            held: Vec::with_capacity(capacity.min(4096)),
            capacity,
            rng,
        }
    }

    /// Add `item`; returns the item that leaves, if the buffer is full.
    pub fn push(&mut self, item: T) -> Option<T> {
        if self.capacity <= 1 {
            return Some(item);
        }
        if self.held.len() < self.capacity {
            self.held.push(item);
            return None;
        }
        let slot = self.rng.random_range(0..self.held.len());
        Some(std::mem::replace(&mut self.held[slot], item))
    }

    /// The items still held, in random order (the end of the stream).
    pub fn drain(mut self) -> impl Iterator<Item = T> {
        self.held.shuffle(&mut self.rng);
        self.held.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn shuffled(n: usize, capacity: usize, seed: u8) -> Vec<usize> {
        let mut buffer = ShuffleBuffer::new(capacity, ChaCha8Rng::from_seed([seed; 32]));
        let mut out: Vec<usize> = (0..n).filter_map(|i| buffer.push(i)).collect();
        out.extend(buffer.drain());
        out
    }

    #[test]
    fn every_item_leaves_exactly_once_in_a_seeded_order() {
        for (n, capacity) in [(10, 4), (10, 64), (100, 7), (3, 1)] {
            let out = shuffled(n, capacity, 1);
            let mut sorted = out.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n={n} capacity={capacity}");
            assert_eq!(out, shuffled(n, capacity, 1), "same seed, same order");
        }
        assert_ne!(shuffled(20, 64, 1), shuffled(20, 64, 2));
        assert_ne!(shuffled(20, 64, 1), (0..20).collect::<Vec<_>>());
        assert_eq!(shuffled(5, 0, 1), vec![0, 1, 2, 3, 4], "capacity 0 keeps the order");
    }

    #[test]
    fn memory_is_bounded_by_the_capacity() {
        let mut buffer = ShuffleBuffer::new(5, ChaCha8Rng::from_seed([0; 32]));
        for i in 0..1000 {
            buffer.push(i);
            assert!(buffer.held.len() <= 5);
        }
        // The k-th item out leaves when item k + 5 arrives: nothing comes out earlier than that window allows.
        let out = shuffled(1000, 5, 3);
        for (position, &item) in out.iter().enumerate() {
            assert!(
                item <= position + 5,
                "item {item} left at {position}, before it arrived"
            );
        }
    }
}

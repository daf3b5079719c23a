//! The simulator's one source of chance: a small seeded generator (SplitMix64), so that a seed
//! names one history. Written here rather than taken from a crate: the simulator needs a handful
//! of draws and a stable sequence across versions, nothing more.

use std::sync::{Arc, Mutex};

/// A seeded generator shared by every part of one simulation; draws happen in the order the
/// (deterministic, single-threaded) runtime makes them.
#[derive(Clone)]
pub struct Rng(Arc<Mutex<u64>>);

impl Rng {
    /// A generator that starts at `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(Arc::new(Mutex::new(seed)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&self) -> u64 {
        let mut state = self.0.lock().unwrap();
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(*state)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// A number in `low..=high`.
    pub fn between(&self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// SplitMix64's output function; also used to hash values into a stable stream of their own.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable hash of `parts` (FNV-1a then mixed): what a task does in one try depends on its
/// seed, run, task and try only, never on the order things happened in.
pub fn hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

//! In-memory `Queue` and `Store` with the same semantics as RabbitMQ and Redis: the standalone
//! mode's backends and the test doubles of the scheduler and worker.

mod queue;
mod store;

pub use queue::MemoryQueue;
pub use store::{MemorySnapshot, MemoryStore};

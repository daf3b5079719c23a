//! A slot's next message, claimed in the same store call that records the outcome of the try
//! that gives the slot back (`Store::finish_and_claim`): the slot never waits a round trip of
//! its own for its next try.
//!
//! As a try ends, its slot takes a message at hand (never waiting for one), from the worker's
//! pools in turn. A message of the same run, of a DAG version loaded here, whose run record is cached,
//! while the worker is in touch with the store, is claimed with the outcome; any other message
//! is handled as usual in the same slot once the outcome is written (one claim round trip, as
//! before). The message is acknowledged only after the claim is in the store. Should the call be
//! answered with an error, both the outcome and the claim are unknown: the outcome is written
//! again as after any error, and the message is handled as usual, its try registered here
//! already, so a claim that did apply is found running under this worker and run.

use std::sync::Arc;

use tokio::time::Instant;

use dagmq_core::messages::{self, TaskToExec};
use dagmq_core::{Delivery, RunRecord};

use crate::Shared;

use super::Registered;
use super::claim::dag_version;
use super::eager::eager_candidates;
use super::running::{TryKey, register};

/// A message a slot took as its try ended.
pub(super) enum TakenMessage {
    /// One this worker can claim with the outcome.
    Claimable(Box<Claimable>),
    /// Any other: handled as usual, in the slot, once the outcome is written.
    Other(Delivery),
}

/// A message whose try a slot claims with the outcome of the try before.
pub(super) struct Claimable {
    /// The delivery, acknowledged once the claim is in the store.
    pub(super) delivery: Delivery,
    /// What it asks to run.
    pub(super) message: TaskToExec,
    /// (run, task, try), registered here.
    pub(super) key: TryKey,
    /// How the try is stopped, and whether its claim applied.
    pub(super) registered: Registered,
    /// Its run's record.
    pub(super) run: Arc<RunRecord>,
    /// The downstream tasks read with the claim, which the try may claim as it succeeds.
    pub(super) read: Vec<String>,
}

/// A message whose try was registered here by a slot that took it, and whose claim went with
/// the outcome of the slot's try before, in a call answered with an error: the claim is unknown.
pub(super) struct Taken {
    /// How the try is stopped, and whether its claim applied.
    pub(super) registered: Registered,
    /// When the call that may have claimed it was sent.
    pub(super) sent: Instant,
}

/// What a slot does once its try's outcome is written, besides eager tries.
#[derive(Default)]
pub(super) struct After {
    /// Whether the slot took a message already (it takes one at most, on its outcome's first
    /// attempt).
    pub(super) took: bool,
    /// A message to handle as usual, with what is known of its claim.
    pub(super) handle: Option<(Delivery, Option<Taken>)>,
    /// The try claimed with the outcome, and its delivery to acknowledge.
    pub(super) claimed: Option<(super::ClaimedTry, Delivery)>,
}

/// The next message at hand, for the slot that a try of `run_id` gives back: from the pools in
/// turn, each slot that looks starting one pool further than the one before, so a pool with a
/// backlog does not starve the worker's other pools; `None` when no pool has one at hand (or
/// another slot reads it now), or the worker is stopping or out of touch with the store.
pub(super) fn take_next(shared: &Shared, run_id: &str) -> Option<TakenMessage> {
    if shared.stopping() || !shared.contact.in_touch() {
        return None;
    }
    let pools = shared.feeds.len();
    let first = shared.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let delivery = (0..pools).find_map(|n| shared.feeds[(first + n) % pools].try_lock().ok()?.take())?;
    let Ok(message) = messages::decode::<TaskToExec>(&delivery.payload) else {
        return Some(TakenMessage::Other(delivery));
    };
    // One run's keys only, in one call; the run's record from the cache (no read of its own).
    let run = shared.runs.lock().unwrap_or_else(|p| p.into_inner()).get(run_id).cloned();
    let Some(run) = run.filter(|_| message.run_id == run_id) else { return Some(TakenMessage::Other(delivery)) };
    let Ok(dag) = dag_version(shared, &run.dag_id, run.dag_version.as_deref()) else {
        return Some(TakenMessage::Other(delivery));
    };
    let key = (message.run_id.clone(), message.task_id.clone(), message.try_number);
    let Some(registered) = register(shared, &key) else { return Some(TakenMessage::Other(delivery)) };
    let read = match message.follow_up {
        None => eager_candidates(shared, &dag, &message.task_id),
        Some(_) => Vec::new(),
    };
    Some(TakenMessage::Claimable(Box::new(Claimable { delivery, message, key, registered, run, read })))
}

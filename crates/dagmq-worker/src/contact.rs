//! What this worker knows of its contact with the store, from its heartbeats: since when the
//! scheduler may have taken it for lost and requeued its tries elsewhere. The heartbeat loop
//! stops running tries once the last heartbeat written is half the worker timeout old
//! (self-fencing); a try claimed before such a silence must not start after it either (a
//! process frozen between its claim and the start of the try, whose try the scheduler meanwhile
//! requeued as a newer one), and this knowledge lets the worker tell without a store read.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The worker's contact with the store, as its heartbeats tell it.
pub(crate) struct Contact {
    /// Half the worker timeout: a silence this long may be taken for a lost worker (with room
    /// for clock skew and for the scheduler's own delays).
    fence_after: Duration,
    state: Mutex<State>,
    /// Counts the heartbeats written, so that a claim waiting for contact wakes up at each.
    written: tokio::sync::watch::Sender<u64>,
}

struct State {
    /// When the latest heartbeat that the store took was sent (its stamp is no older).
    last_written: Instant,
    /// When the latest silence of at least `fence_after` ended: the answer to the heartbeat
    /// that broke it. The scheduler may have requeued this worker's tries at any time before.
    last_silence_end: Option<Instant>,
}

impl Contact {
    /// Contact as of now (the worker starts in touch), for a scheduler whose worker timeout is
    /// `worker_timeout`.
    pub(crate) fn new(worker_timeout: Duration) -> Contact {
        Contact {
            fence_after: worker_timeout / 2,
            state: Mutex::new(State { last_written: Instant::now(), last_silence_end: None }),
            written: tokio::sync::watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A heartbeat sent at `sent` was written, and its answer is in now. When the heartbeat
    /// written before it was sent `fence_after` or more before now, the store heard nothing
    /// fresh from this worker for that long: a silence, which ends now.
    pub(crate) fn heartbeat_written(&self, sent: Instant) {
        let now = Instant::now();
        let mut state = self.lock();
        if now.saturating_duration_since(state.last_written) >= self.fence_after {
            state.last_silence_end = Some(now);
        }
        state.last_written = state.last_written.max(sent);
        drop(state);
        self.written.send_modify(|written| *written += 1);
    }

    /// How long ago the latest heartbeat that the store took was sent.
    pub(crate) fn silent_for(&self) -> Duration {
        self.lock().last_written.elapsed()
    }

    /// Whether the worker is in touch now: its latest heartbeat written was sent less than half
    /// the worker timeout ago.
    pub(crate) fn in_touch(&self) -> bool {
        self.silent_for() < self.fence_after
    }

    /// Waits until the worker is in touch, at most `within` (less if `stop` fires); answers
    /// whether it is. A worker out of touch claims nothing: the try could not start.
    pub(crate) async fn wait_in_touch(&self, within: Duration, stop: &dagmq_core::CancelSignal) -> bool {
        let mut written = self.written.subscribe();
        let deadline = Instant::now() + within;
        loop {
            if self.in_touch() {
                return true;
            }
            tokio::select! {
                _ = written.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return self.in_touch(),
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// Whether a try claimed by a call sent at `claimed` may start now: the scheduler cannot
    /// have taken this worker for lost since then (no silence ended after it, and none is under
    /// way), so the try is still this worker's, and the heartbeat loop's self-fencing covers
    /// it from here on.
    pub(crate) fn in_touch_since(&self, claimed: Instant) -> bool {
        let state = self.lock();
        state.last_written.elapsed() < self.fence_after && state.last_silence_end.is_none_or(|end| end <= claimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_try_claimed_before_a_silence_never_starts_after_it() {
        let contact = Contact::new(Duration::from_secs(20));
        let claimed = Instant::now();
        assert!(contact.in_touch_since(claimed));

        // Heartbeats every 5 s: no silence.
        tokio::time::advance(Duration::from_secs(5)).await;
        contact.heartbeat_written(Instant::now());
        assert!(contact.in_touch_since(claimed));

        // A silence under way (frozen, or the store out of reach): the try must not start.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!contact.in_touch_since(claimed));
        assert_eq!(contact.silent_for(), Duration::from_secs(10));

        // The next heartbeat gets through: the silence is over, but the scheduler may have
        // requeued the try during it. A try claimed after it may start.
        tokio::time::advance(Duration::from_secs(20)).await;
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        contact.heartbeat_written(sent);
        assert!(!contact.in_touch_since(claimed), "claimed before the silence ended");
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(contact.in_touch_since(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_waits_for_contact_and_gives_up_after_its_bound() {
        let contact = std::sync::Arc::new(Contact::new(Duration::from_secs(20)));
        let (_stop, signal) = dagmq_core::CancelSignal::new();
        assert!(contact.wait_in_touch(Duration::from_secs(1), &signal).await);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!contact.wait_in_touch(Duration::from_secs(3), &signal).await, "no heartbeat: it gives up");
        let waiting = tokio::spawn({
            let (contact, signal) = (contact.clone(), signal.clone());
            async move { contact.wait_in_touch(Duration::from_secs(30), &signal).await }
        });
        tokio::time::advance(Duration::from_secs(2)).await;
        contact.heartbeat_written(Instant::now());
        assert!(waiting.await.unwrap(), "a heartbeat written wakes it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_answered_late_counts_from_when_it_was_sent_and_ends_a_silence_when_answered() {
        let contact = Contact::new(Duration::from_secs(20));
        let claimed = Instant::now();
        // A heartbeat sent at once whose answer takes 12 s (a call stalled, the process frozen
        // with the answer unread): the store may have taken it at any time in between.
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(12)).await;
        contact.heartbeat_written(sent);
        assert!(!contact.in_touch_since(claimed), "the last heartbeat written was sent 12 s ago");
        assert!(!contact.in_touch_since(Instant::now()));
    }
}

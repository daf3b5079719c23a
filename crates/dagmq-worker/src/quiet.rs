//! Warnings that a redelivered message would repeat every few seconds (a try this worker cannot
//! run, put back for another worker) are written once per [`QUIET_FOR`] for each reason; the
//! repeats go to the debug level.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a warning stays quiet after it was written.
pub(crate) const QUIET_FOR: Duration = Duration::from_secs(300);

/// When each warning was last written, by its text.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    written: Mutex<HashMap<String, Instant>>,
}

impl Quiet {
    /// Whether `warning` is to be written now: not written within [`QUIET_FOR`].
    pub(crate) fn due(&self, warning: &str) -> bool {
        let now = Instant::now();
        let mut written = self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        written.retain(|_, at| now.duration_since(*at) < QUIET_FOR);
        if written.contains_key(warning) {
            return false;
        }
        written.insert(warning.to_string(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_warning_is_written_once_in_five_minutes_for_each_reason() {
        let quiet = Quiet::default();
        assert!(quiet.due("worker w does not know dag \"a\""));
        assert!(quiet.due("worker w does not know dag \"b\""), "another reason is news");
        for _ in 0..100 {
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(!quiet.due("worker w does not know dag \"a\""));
        }
        tokio::time::advance(QUIET_FOR).await;
        assert!(quiet.due("worker w does not know dag \"a\""), "written again once the quiet is over");
    }
}

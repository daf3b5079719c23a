//! Live DAG reload: the DAG directory is read again every [`POLL`] and at once on SIGHUP; when a
//! file was added, changed or removed, the process's [`LiveDags`] is replaced. A changed file
//! that no longer loads keeps its last good version (and is listed as refused, with the
//! reason); a removed file's DAG goes away (its schedule stops; its runs stay readable). Every
//! version loaded stays known, so runs complete with the definition they were created with.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dagmq_core::{Dag, DagRegistry, LiveDags, Params, Pools, TaskRegistry};

use crate::load::load_files;

/// How often the directory is read again.
pub(crate) const POLL: Duration = Duration::from_secs(2);

/// Reloads one process's DAGs.
pub(crate) struct Reloader {
    dir: PathBuf,
    rust_dags: DagRegistry,
    tasks: TaskRegistry,
    pools: Option<Pools>,
    /// The last good DAG of each file, with its `[params]`.
    good: BTreeMap<String, (Arc<Dag>, Params)>,
    /// Each file's content version at the last load.
    seen: BTreeMap<String, String>,
    live: Arc<LiveDags>,
}

impl Reloader {
    /// Loads the directory the first time; fails only when it cannot be read.
    pub(crate) fn new(
        dir: &Path,
        rust_dags: &DagRegistry,
        tasks: &TaskRegistry,
        pools: Option<&Pools>,
    ) -> anyhow::Result<Reloader> {
        crate::load::check_rust_pools(rust_dags, pools)?;
        let mut reloader = Reloader {
            dir: dir.to_path_buf(),
            rust_dags: rust_dags.clone(),
            tasks: tasks.clone(),
            pools: pools.cloned(),
            good: BTreeMap::new(),
            seen: BTreeMap::new(),
            live: Arc::new(LiveDags::default()),
        };
        reloader.reload()?;
        Ok(reloader)
    }

    /// The live set this reloader keeps up to date.
    pub(crate) fn live(&self) -> Arc<LiveDags> {
        self.live.clone()
    }

    /// The content version of every DAG file now, to tell whether anything changed.
    fn fingerprint(&self) -> BTreeMap<String, String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return BTreeMap::new() };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|path| {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                (path.display().to_string(), dagmq_core::dag::content_version(&text))
            })
            .collect()
    }

    /// Loads the directory again and puts the result in place; answers what changed, or `None`
    /// when nothing did.
    fn reload(&mut self) -> anyhow::Result<Option<String>> {
        let fingerprint = self.fingerprint();
        let first = self.seen.is_empty() && self.good.is_empty();
        if !first && fingerprint == self.seen {
            return Ok(None);
        }
        let mut good = BTreeMap::new();
        let mut refused = Vec::new();
        for (file, result) in load_files(&self.dir, &self.tasks, self.pools.as_ref())? {
            match result {
                Ok(loaded) => {
                    good.insert(file, (Arc::new(loaded.dag), loaded.default_params));
                }
                Err(message) => match self.good.get(&file) {
                    Some(last) => {
                        good.insert(file.clone(), last.clone());
                        refused.push((file, format!("{message} (the last good version stays loaded)")));
                    }
                    None => refused.push((file, message)),
                },
            }
        }
        let mut dags = self.rust_dags.clone();
        let mut params = HashMap::new();
        for (file, (dag, file_params)) in &good {
            match dags.add_shared(dag.clone()) {
                Ok(()) => {
                    params.insert(dag.id.clone(), file_params.clone());
                }
                Err(err) => refused.push((file.clone(), format!("{file}: {err}"))),
            }
        }
        let summary = self.describe(&good);
        for (_, message) in &refused {
            tracing::error!("dag file refused: {message}");
        }
        self.live.replace(dags, refused, params);
        self.good = good;
        self.seen = fingerprint;
        Ok(Some(summary))
    }

    /// What a reload changed, for the log.
    fn describe(&self, good: &BTreeMap<String, (Arc<Dag>, Params)>) -> String {
        let version = |set: &BTreeMap<String, (Arc<Dag>, Params)>, file: &str| {
            set.get(file).map(|(dag, _)| (dag.id.clone(), dag.version.clone()))
        };
        let mut parts = Vec::new();
        for file in good.keys() {
            match (version(&self.good, file), version(good, file)) {
                (None, Some((id, _))) => parts.push(format!("added {id}")),
                (Some(old), Some(new)) if old != new => {
                    parts.push(format!("changed {} ({} -> {})", new.0, old.1, new.1))
                }
                _ => {}
            }
        }
        for (file, (dag, _)) in &self.good {
            if !good.contains_key(file) {
                parts.push(format!("removed {}", dag.id));
            }
        }
        if parts.is_empty() { NO_CHANGE.to_string() } else { parts.join(", ") }
    }

    /// Reloads every [`POLL`], on SIGHUP and at once when the process asks
    /// ([`LiveDags::request_read`]: a worker handed a try of a version it has not loaded yet)
    /// until `stop` fires, calling `changed` after each reload that replaced the set. Every read
    /// wakes whoever waits for one ([`LiveDags::reads`]), whether it changed anything or not.
    pub(crate) async fn watch<F, Fut>(mut self, stop: dagmq_core::CancelSignal, changed: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let live = self.live.clone();
        loop {
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => Why::Poll,
                _ = live.read_requested() => Why::Asked,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Why::Hangup,
            };
            match why {
                Why::Hangup => {
                    tracing::info!("SIGHUP: reloading the dags");
                    self.seen.clear();
                }
                Why::Asked => tracing::debug!("reading the dags directory now, as a try of an unknown version asks"),
                Why::Poll => {}
            }
            match self.reload() {
                Ok(Some(summary)) => {
                    // A read that changed no DAG (asked for by a try of a version not loaded) is
                    // not news.
                    if summary == NO_CHANGE {
                        tracing::debug!(dags = self.live.current().len(), "dags read again: {summary}");
                    } else {
                        tracing::info!(dags = self.live.current().len(), "dags reloaded: {summary}");
                    }
                    changed().await;
                }
                Ok(None) => live.read_done(),
                Err(err) => {
                    tracing::error!("reloading the dags: {err:#}");
                    live.read_done();
                }
            }
        }
    }
}

/// What a reload that changed no DAG says.
const NO_CHANGE: &str = "no dag changed";

/// Why the directory is read again.
enum Why {
    /// Its turn came ([`POLL`]).
    Poll,
    /// The process asked ([`LiveDags::request_read`]).
    Asked,
    /// SIGHUP: read every file again, changed or not.
    Hangup,
}

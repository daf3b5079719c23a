//! The DAGs a process has loaded: [`DagRegistry`] (by id) and [`LiveDags`] (replaced on reload,
//! keeping every version), and [`content_version`], a DAG file's version.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Dag, DagError};
/// A DAG file's version: the FNV-1a 64-bit hash of its text, in hex. Stable across builds and
/// machines, so a scheduler and its workers agree on it.
pub fn content_version(text: &str) -> String {
    content_version_bytes(text.as_bytes())
}

/// [`content_version`] of any bytes.
pub fn content_version_bytes(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The DAGs a process has loaded, replaced as a whole when its DAG files change (live reload),
/// with every version it has loaded, so a run completes with the definition it was created
/// with. Readers take a snapshot (`current`); a reload bumps `generation`.
///
/// Whoever keeps the set up to date (the binary's reloader) also answers requests to read the
/// sources now ([`LiveDags::request_read`]): a worker handed a try of a version it has not
/// loaded yet asks for one, and waits for the reads that follow ([`LiveDags::reads`]).
#[derive(Default)]
pub struct LiveDags {
    state: std::sync::RwLock<LiveState>,
    /// Requests to read the sources now; one made while a read is under way is kept for the
    /// next.
    requests: tokio::sync::Notify,
    /// Counts the reads of the sources (each replacement, and each read that found nothing
    /// new), so that a waiter wakes up after each.
    reads: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct LiveState {
    current: Arc<DagRegistry>,
    refused: Arc<Vec<(String, String)>>,
    default_params: Arc<HashMap<String, crate::task::Params>>,
    /// Every version loaded, by DAG id and version (looked up by `&str` on a worker's hot path).
    versions: HashMap<String, HashMap<String, Arc<Dag>>>,
    generation: u64,
}

impl LiveDags {
    /// The DAGs loaded at start, the files refused, and the files' `[params]` defaults.
    pub fn new(
        dags: DagRegistry,
        refused: Vec<(String, String)>,
        default_params: HashMap<String, crate::task::Params>,
    ) -> LiveDags {
        let live = LiveDags::default();
        live.replace(dags, refused, default_params);
        live
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, LiveState> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The DAGs loaded now.
    pub fn current(&self) -> Arc<DagRegistry> {
        self.read().current.clone()
    }

    /// The files refused at the last (re)load, as (file, `file:line: reason`).
    pub fn refused(&self) -> Arc<Vec<(String, String)>> {
        self.read().refused.clone()
    }

    /// Why DAG `dag_id` is not loaded, when a refused file is its: the refusal of the file that
    /// names it (its reason says `dag "ID"`) or whose name is `ID.toml`.
    pub fn refusal_of(&self, dag_id: &str) -> Option<String> {
        let state = self.read();
        state
            .refused
            .iter()
            .find(|(file, reason)| refused_dag_id(file, reason, &state.current) == dag_id)
            .map(|(_, r)| r.clone())
    }

    /// `[params]` defaults per DAG.
    pub fn default_params(&self) -> Arc<HashMap<String, crate::task::Params>> {
        self.read().default_params.clone()
    }

    /// Bumped by every reload.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// The definition of `dag_id` at `version`, if this process has loaded it at some point.
    pub fn version(&self, dag_id: &str, version: &str) -> Option<Arc<Dag>> {
        self.read().versions.get(dag_id).and_then(|versions| versions.get(version)).cloned()
    }

    /// The versions of `dag_id` this process has loaded.
    pub fn versions_of(&self, dag_id: &str) -> Vec<String> {
        let mut versions: Vec<String> =
            self.read().versions.get(dag_id).map(|v| v.keys().cloned().collect()).unwrap_or_default();
        versions.sort();
        versions
    }

    /// Asks whoever keeps this set up to date to read its sources now (a worker handed a try of a
    /// version it has not loaded). Without a reloader, nobody answers, and the set changes only
    /// when it is replaced.
    pub fn request_read(&self) {
        self.requests.notify_one();
    }

    /// Waits for a [`LiveDags::request_read`] (made before or during this wait), for the
    /// reloader.
    pub async fn read_requested(&self) {
        self.requests.notified().await;
    }

    /// Tells the waiters that the sources were read and nothing changed (a replacement tells
    /// them itself).
    pub fn read_done(&self) {
        self.reads.send_modify(|reads| *reads += 1);
    }

    /// A receiver that sees a change after every read of the sources: a replacement, or a read
    /// that found nothing new. Take it before looking for a version, so that no read between
    /// the look and the wait is missed.
    pub fn reads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reads.subscribe()
    }

    /// Puts a new set in place; earlier versions stay known.
    pub fn replace(
        &self,
        dags: DagRegistry,
        refused: Vec<(String, String)>,
        default_params: HashMap<String, crate::task::Params>,
    ) {
        let mut state = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for dag in dags.iter() {
            state.versions.entry(dag.id.clone()).or_default().entry(dag.version.clone()).or_insert_with(|| dag.clone());
        }
        state.current = Arc::new(dags);
        state.refused = Arc::new(refused);
        state.default_params = Arc::new(default_params);
        state.generation += 1;
        drop(state);
        self.read_done();
    }
}

/// DAGs by id, as the scheduler and workers load them.
#[derive(Default, Clone)]
pub struct DagRegistry {
    /// DAGs by id, sorted for stable listings.
    dags: BTreeMap<String, Arc<Dag>>,
}

impl DagRegistry {
    /// An empty registry.
    pub fn new() -> DagRegistry {
        DagRegistry::default()
    }

    /// Adds a DAG that is shared already (a reload keeping the last good version).
    pub fn add_shared(&mut self, dag: Arc<Dag>) -> Result<(), DagError> {
        if let Some(existing) = self.dags.get(&dag.id) {
            return Err(DagError::Invalid {
                dag: dag.id.clone(),
                reason: format!("defined twice: in {} and in {}", existing.source, dag.source),
            });
        }
        self.dags.insert(dag.id.clone(), dag);
        Ok(())
    }

    /// Adds a DAG; refuses a second DAG with the same id.
    pub fn add(&mut self, dag: Dag) -> Result<(), DagError> {
        if let Some(existing) = self.dags.get(&dag.id) {
            return Err(DagError::Invalid {
                dag: dag.id.clone(),
                reason: format!("defined twice: in {} and in {}", existing.source, dag.source),
            });
        }
        self.dags.insert(dag.id.clone(), Arc::new(dag));
        Ok(())
    }

    /// One DAG by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Dag>> {
        self.dags.get(id)
    }

    /// All DAGs, sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Dag>> {
        self.dags.values()
    }

    /// Number of DAGs.
    pub fn len(&self) -> usize {
        self.dags.len()
    }

    /// Whether there are no DAGs.
    pub fn is_empty(&self) -> bool {
        self.dags.is_empty()
    }
}

/// The id of the DAG of a refused `file`: the one its `reason` names (`dag "ID"`) unless a DAG of
/// that id is `loaded` (from another file: the refused one repeats its id), else the file's name
/// without its extension (a file refused before its id was read).
pub fn refused_dag_id(file: &str, reason: &str, loaded: &DagRegistry) -> String {
    reason
        .split_once("dag \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(id, _)| id.to_string())
        .filter(|id| crate::dag::check_id(id).is_ok() && loaded.get(id).is_none())
        .unwrap_or_else(|| {
            std::path::Path::new(file).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dag::TaskSpec;

    #[test]
    fn a_refused_file_is_the_dag_it_names_unless_that_dag_is_loaded_from_another() {
        let mut loaded = DagRegistry::default();
        let mut a = crate::Dag::builder("a").task(cmd("t")).build().unwrap();
        a.source = "dags/a.toml".to_string();
        loaded.add(a).unwrap();
        assert_eq!(
            refused_dag_id("dags/zz_loop.toml", "dags/zz_loop.toml:3: dag \"loop\": cycle x -> x", &loaded),
            "loop"
        );
        let twice = "dags/b.toml: dag \"a\": defined twice: in dags/a.toml and in dags/b.toml";
        assert_eq!(refused_dag_id("dags/b.toml", twice, &loaded), "b", "a is loaded from a.toml");
        assert_eq!(refused_dag_id("dags/c.toml", "dags/c.toml:2: expected `=`", &loaded), "c", "no id read");
        let live = LiveDags::new(
            loaded,
            vec![
                ("dags/zz_loop.toml".into(), "dags/zz_loop.toml:3: dag \"loop\": cycle".into()),
                ("dags/b.toml".into(), twice.into()),
            ],
            HashMap::new(),
        );
        assert_eq!(live.refusal_of("loop").as_deref(), Some("dags/zz_loop.toml:3: dag \"loop\": cycle"));
        assert_eq!(live.refusal_of("b").as_deref(), Some(twice));
        assert_eq!(live.refusal_of("lo"), None, "ids are compared whole");
    }

    fn cmd(id: &str) -> TaskSpec {
        TaskSpec::command(id, ["true"])
    }

    #[tokio::test]
    async fn a_read_request_reaches_the_reloader_and_each_read_wakes_the_waiters() {
        let registry = |version: &str| {
            let mut dags = DagRegistry::new();
            dags.add(Dag::builder("d").version(version).task(cmd("a")).build().unwrap()).unwrap();
            dags
        };
        let live = LiveDags::new(registry("v1"), Vec::new(), HashMap::new());
        // A request made before the reloader waits is kept for it.
        live.request_read();
        live.read_requested().await;
        let mut reads = live.reads();
        assert!(!reads.has_changed().unwrap());
        live.read_done();
        assert!(reads.has_changed().unwrap(), "a read that found nothing new wakes the waiters");
        reads.borrow_and_update();
        assert!(live.version("d", "v2").is_none());
        live.replace(registry("v2"), Vec::new(), HashMap::new());
        assert!(reads.has_changed().unwrap(), "a replacement wakes the waiters");
        assert!(live.version("d", "v2").is_some() && live.version("d", "v1").is_some());
    }

    #[test]
    fn registry_refuses_duplicate_dag() {
        let mut registry = DagRegistry::new();
        registry.add(Dag::builder("a").source("a.toml").task(cmd("t")).build().unwrap()).unwrap();
        let err = registry.add(Dag::builder("a").source("b.toml").task(cmd("t")).build().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), r#"dag "a": defined twice: in a.toml and in b.toml"#);
    }
}

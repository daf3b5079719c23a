//! Loading DAG files from a directory: good files become DAGs, bad ones become errors that name
//! the file, the line and the reason, and never stop the good ones from loading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use dagmq_core::dag_file::parse_dag_file_with_pools;
use dagmq_core::{Dag, DagRegistry, Params, Pools, TaskRegistry};

/// What a directory held.
pub struct LoadedDags {
    /// The DAGs that loaded, with the binary's Rust DAGs.
    pub dags: DagRegistry,
    /// `[params]` defaults per DAG.
    pub default_params: HashMap<String, Params>,
    /// One `file:line: reason` per refused file.
    pub errors: Vec<String>,
    /// The refused files as (file, `file:line: reason`), for the API.
    pub refused: Vec<(String, String)>,
}

/// Loads every `*.toml` file of `dir` (in name order) beside `rust_dags`. With `pools`, a task
/// naming a pool not among them is refused (a file), or fails the load (a Rust DAG, compiled
/// in). Fails otherwise only when the directory cannot be read.
pub fn load_dags(
    dir: Option<&Path>,
    rust_dags: &DagRegistry,
    tasks: &TaskRegistry,
    pools: Option<&Pools>,
) -> anyhow::Result<LoadedDags> {
    match dir {
        Some(dir) => load_paths(&toml_files(dir)?, rust_dags, tasks, pools),
        None => load_paths(&[], rust_dags, tasks, pools),
    }
}

/// Loads the DAG files `paths` (in that order) beside `rust_dags`, as [`load_dags`] loads a
/// directory's: `dagmq validate FILE...`.
pub fn load_paths(
    paths: &[PathBuf],
    rust_dags: &DagRegistry,
    tasks: &TaskRegistry,
    pools: Option<&Pools>,
) -> anyhow::Result<LoadedDags> {
    check_rust_pools(rust_dags, pools)?;
    let mut loaded =
        LoadedDags { dags: rust_dags.clone(), default_params: HashMap::new(), errors: Vec::new(), refused: Vec::new() };
    for (name, result) in parse_files(paths, tasks, pools) {
        match result {
            Ok(file) => {
                let id = file.dag.id.clone();
                add(&mut loaded, file.dag, &name);
                loaded.default_params.insert(id, file.default_params);
            }
            Err(message) => refuse(&mut loaded, &name, message),
        }
    }
    Ok(loaded)
}

/// Refuses Rust DAGs (compiled in) that name a pool not among `pools`.
pub(crate) fn check_rust_pools(rust_dags: &DagRegistry, pools: Option<&Pools>) -> anyhow::Result<()> {
    if let Some(pools) = pools {
        for dag in rust_dags.iter() {
            dagmq_core::dag::check_pools(dag, pools).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(())
}

/// Every `*.toml` file of `dir` in name order, each parsed or refused with `file:line: reason`.
pub(crate) fn load_files(
    dir: &Path,
    tasks: &TaskRegistry,
    pools: Option<&Pools>,
) -> anyhow::Result<Vec<(String, Result<dagmq_core::dag_file::LoadedDag, String>)>> {
    Ok(parse_files(&toml_files(dir)?, tasks, pools))
}

/// The `*.toml` files of `dir`, in name order.
fn toml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read the dags directory {}", dir.display()))?;
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Each of `paths` parsed, or refused with `file:line: reason`.
fn parse_files(
    paths: &[PathBuf],
    tasks: &TaskRegistry,
    pools: Option<&Pools>,
) -> Vec<(String, Result<dagmq_core::dag_file::LoadedDag, String>)> {
    paths
        .iter()
        .map(|path| {
            let name = path.display().to_string();
            let result = match std::fs::read_to_string(path) {
                Ok(text) => parse_dag_file_with_pools(&name, &text, tasks, pools).map_err(|e| e.to_string()),
                Err(err) => Err(format!("{name}: cannot read: {err}")),
            };
            (name, result)
        })
        .collect()
}

fn add(loaded: &mut LoadedDags, dag: Dag, file: &str) {
    if let Err(err) = loaded.dags.add(dag) {
        refuse(loaded, file, format!("{file}: {err}"));
    }
}

fn refuse(loaded: &mut LoadedDags, file: &str, message: String) {
    loaded.errors.push(message.clone());
    loaded.refused.push((file.to_string(), message));
}

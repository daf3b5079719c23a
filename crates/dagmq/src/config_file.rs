//! The optional config file: defaults for flags, below flags and environment variables.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Keys a config file may set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    /// Directory of DAG files.
    pub dags: Option<PathBuf>,
    /// API port.
    pub port: Option<u16>,
    /// API address.
    pub bind: Option<String>,
    /// Worker concurrency.
    pub concurrency: Option<usize>,
    /// The scheduler's API, for client commands.
    pub api: Option<String>,
    /// Webhook for failure notifications.
    pub notify_webhook: Option<String>,
    /// How long a stopping worker waits for running tasks, e.g. "30s".
    pub grace_period: Option<String>,
    /// Named concurrency pools and their slots (`[pools]`, e.g. `db = 4`).
    #[serde(default)]
    pub pools: dagmq_core::Pools,
}

impl ConfigFile {
    /// The pools of the file with `--pool NAME=SLOTS` flags over them.
    pub(crate) fn pools(&self, flags: &[String]) -> Result<dagmq_core::Pools, String> {
        let mut pools = self.pools.clone();
        for flag in flags {
            let Some((name, slots)) = flag.split_once('=') else {
                return Err(format!("--pool {flag:?}: expected NAME=SLOTS"));
            };
            let slots: u32 =
                slots.trim().parse().map_err(|_| format!("--pool {flag:?}: SLOTS must be a whole number"))?;
            pools.insert(name.trim().to_string(), slots);
        }
        for (name, slots) in &pools {
            dagmq_core::dag::check_id(name).map_err(|reason| format!("pool {name:?}: bad name: {reason}"))?;
            if *slots == 0 {
                return Err(format!("pool {name:?}: needs at least 1 slot"));
            }
        }
        Ok(pools)
    }
}

impl ConfigFile {
    /// Reads the file, or the empty config when none is named.
    pub(crate) fn load(path: Option<&Path>) -> anyhow::Result<ConfigFile> {
        let Some(path) = path else { return Ok(ConfigFile::default()) };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| match e.span() {
            Some(span) => {
                let line = dagmq_core::dag_file::line_of(&text, span.start);
                anyhow::anyhow!("{}:{line}: {}", path.display(), e.message().trim())
            }
            None => anyhow::anyhow!("{}: {}", path.display(), e.message().trim()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(name: &str, text: &str) -> String {
        let path = std::env::temp_dir().join(format!("dagmq-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let err = ConfigFile::load(Some(&path)).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        err.replace(&path.display().to_string(), "FILE")
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            load_text("unknown", "port = 9191\n\nfoo = 1\n"),
            "FILE:3: unknown field `foo`, expected one of `dags`, `port`, `bind`, `concurrency`, `api`, \
             `notify_webhook`, `grace_period`, `pools`"
        );
        assert_eq!(
            load_text("type", "dags = \"d\"\nport = \"x\"\n"),
            "FILE:2: invalid type: string \"x\", expected u16"
        );
        assert!(load_text("syntax", "port = 1\nbind = \n").starts_with("FILE:2: "));
    }
}

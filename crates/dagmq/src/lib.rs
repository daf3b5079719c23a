//! dagmq: the command line and the wiring of adapters. A user's own binary builds an [`App`]
//! with its Rust DAGs and tasks and calls [`App::main`], as ppacer users write their own `main`.
//!
//! ```no_run
//! use dagmq::App;
//! use dagmq_core::{Dag, TaskSpec};
//!
//! fn main() -> std::process::ExitCode {
//!     let dag = Dag::builder("hello").task(TaskSpec::command("say", ["echo", "hello"])).build().unwrap();
//!     App::new().dag(dag).main()
//! }
//! ```

mod bench;
pub mod cli;
pub mod client;
mod client_commands;
mod config_file;
pub mod load;
pub mod otel;
mod reload;
mod secrets;
mod standalone;
mod webhook;

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use dagmq_core::{Dag, DagRegistry, Task, TaskRegistry};

use cli::{Cli, Command};
use client_commands::Api;
use config_file::ConfigFile;

/// A dagmq program: the shipped binary, or a user's own with its Rust DAGs and tasks.
pub struct App {
    /// DAGs defined in Rust.
    dags: DagRegistry,
    /// Named Rust tasks for `run = "NAME"` and follow-ups (`noop` and `sleep` included).
    tasks: TaskRegistry,
    /// DAGs refused at registration (duplicate ids), reported at start.
    errors: Vec<String>,
}

impl Default for App {
    fn default() -> App {
        App::new()
    }
}

impl App {
    /// An app with the builtin tasks `noop` and `sleep` and no Rust DAGs.
    pub fn new() -> App {
        App { dags: DagRegistry::new(), tasks: dagmq_worker::builtin_tasks(), errors: Vec::new() }
    }

    /// Adds a DAG written in Rust.
    pub fn dag(mut self, dag: Dag) -> App {
        if let Err(err) = self.dags.add(dag) {
            self.errors.push(err.to_string());
        }
        self
    }

    /// Registers a Rust task that DAG files name with `run = "NAME"`; `factory` builds it from
    /// the task's `args`.
    pub fn task<F>(mut self, name: &str, factory: F) -> App
    where
        F: Fn(&serde_json::Value) -> Result<Arc<dyn Task>, String> + Send + Sync + 'static,
    {
        self.tasks.register(name, factory);
        self
    }

    /// Parses the process's arguments, runs the command and answers its exit code.
    pub fn main(self) -> ExitCode {
        self.run_with_args(std::env::args_os())
    }

    /// Like [`App::main`] with explicit arguments (the first is the program name).
    pub fn run_with_args<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = match Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(err) => {
                let _ = err.print();
                return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
            }
        };
        if let Err(message) = init_tracing(if matches!(cli.command, Command::Bench(_)) { "warn" } else { "info" }) {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
        client::install_crypto_provider();
        if let Err(message) = setup_fail_points() {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("error: cannot start the async runtime: {err}");
                return ExitCode::from(1);
            }
        };
        match runtime.block_on(self.run(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                if !err.message.is_empty() {
                    eprintln!("error: {err}");
                }
                ExitCode::from(err.code)
            }
        }
    }

    async fn run(self, cli: Cli) -> CliResult<()> {
        if !self.errors.is_empty() {
            return Err(CliError::usage(self.errors.join("\n")));
        }
        let file = ConfigFile::load(cli.config.as_deref()).map_err(|e| CliError::usage(format!("{e:#}")))?;
        match &cli.command {
            Command::Standalone(args) => {
                standalone::serve(&self, &args.into(), &file, standalone::Role::Standalone).await
            }
            Command::Scheduler(args) => {
                standalone::serve(&self, &args.into(), &file, standalone::Role::Scheduler).await
            }
            Command::Worker(args) => standalone::serve(&self, &args.into(), &file, standalone::Role::Worker).await,
            Command::Validate(args) => {
                let pools = file.pools(&args.pools).map_err(CliError::usage)?;
                self.validate(&args.files, args.dags.as_deref().or(file.dags.as_deref()), &pools)
            }
            Command::Trigger(args) => {
                client_commands::trigger(&Api::new(&args.client, file.api.as_deref())?, args).await
            }
            Command::Dags(args) => {
                client_commands::dags(&Api::new(&args.client, file.api.as_deref())?, &args.command).await
            }
            Command::Runs(args) => {
                client_commands::runs(&Api::new(&args.client, file.api.as_deref())?, &args.command).await
            }
            Command::Logs(args) => client_commands::logs(&Api::new(&args.client, file.api.as_deref())?, args).await,
            Command::Workers(args) => client_commands::workers(&Api::new(args, file.api.as_deref())?).await,
            Command::Bench(args) => bench::bench(args).await,
        }
    }

    /// `dagmq validate`: every refused file on its own line, exit 2 if any. Checks `files` when
    /// given, else the directory `dir`.
    fn validate(
        &self,
        files: &[std::path::PathBuf],
        dir: Option<&std::path::Path>,
        pools: &dagmq_core::Pools,
    ) -> CliResult<()> {
        let loaded = if !files.is_empty() {
            load::load_paths(files, &self.dags, &self.tasks, Some(pools))
        } else if let Some(dir) = dir {
            if dir.is_file() {
                return Err(CliError::usage(format!(
                    "--dags {} is a file: give a directory, or the file itself (dagmq validate {0})",
                    dir.display()
                )));
            }
            load::load_dags(Some(dir), &self.dags, &self.tasks, Some(pools))
        } else {
            return Err(CliError::usage(
                "validate needs DAG files (dagmq validate FILE...) or --dags DIR (DAGMQ_DAGS)",
            ));
        }
        .map_err(|e| CliError::usage(format!("{e:#}")))?;
        let dir = dir.unwrap_or(std::path::Path::new("."));
        for error in &loaded.errors {
            eprintln!("{error}");
        }
        if loaded.errors.is_empty() && loaded.dags.is_empty() {
            Err(CliError::usage(format!("no DAG files (*.toml) in {}", dir.display())))
        } else if loaded.errors.is_empty() {
            out!("{} dags ok", loaded.dags.len());
            Ok(())
        } else {
            Err(CliError::usage(format!("{} of the dag files are invalid", loaded.errors.len())))
        }
    }
}

/// Writes a line to standard output. A reader that has gone (a pipe into `head` that closed)
/// ends the command quietly with exit 0, as `SIGPIPE` ends other Unix tools; any other write
/// error is a runtime failure.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))?
    };
}
pub(crate) use out;

/// The body of [`out!`].
pub(crate) fn write_out(line: fmt::Arguments<'_>) -> CliResult<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::reader_gone()),
        Err(err) => Err(CliError::runtime(format!("writing to standard output: {err}"))),
    }
}

/// A command's failure and its exit code: 2 for bad usage or input, 1 for runtime failures.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// What went wrong.
    pub message: String,
}

impl CliError {
    /// Bad usage: exit 2.
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError { code: 2, message: message.into() }
    }

    /// Bad input (the API refused it): exit 2.
    pub fn input(message: impl Into<String>) -> CliError {
        CliError { code: 2, message: message.into() }
    }

    /// Something failed at run time: exit 1.
    pub fn runtime(message: impl Into<String>) -> CliError {
        CliError { code: 1, message: message.into() }
    }

    /// The reader of standard output has gone: stop quietly, exit 0.
    pub fn reader_gone() -> CliError {
        CliError { code: 0, message: String::new() }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A command's result.
pub type CliResult<T> = Result<T, CliError>;

/// Logs to stderr, filtered by `DAGMQ_LOG` (default `default_filter`): one JSON object a line
/// with `DAGMQ_LOG_FORMAT=json`, text otherwise, coloured only when stderr is a terminal and
/// `NO_COLOR` is unset or empty (<https://no-color.org>). Any other format is an error.
fn init_tracing(default_filter: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DAGMQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let format = std::env::var("DAGMQ_LOG_FORMAT").unwrap_or_default();
    let _ = match format.trim().to_ascii_lowercase().as_str() {
        "json" => builder.json().flatten_event(true).try_init(),
        "" | "text" => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
            builder.with_ansi(std::io::stderr().is_terminal() && !no_color).try_init()
        }
        _ => return Err(format!("DAGMQ_LOG_FORMAT={format:?}: expected text or json")),
    };
    Ok(())
}

/// Arms the fail points named in `FAILPOINTS` (`name=action;...`, actions as the `fail` crate
/// reads them: `panic`, `return`, `sleep(ms)`, `1*panic`, ...). A fail point that panics aborts
/// the process, as a crash at that step would. Builds without the `failpoints` feature refuse
/// `FAILPOINTS` rather than ignore it.
fn setup_fail_points() -> Result<(), String> {
    if std::env::var_os("FAILPOINTS").is_none() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        std::mem::forget(fail::FailScenario::setup());
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if text.starts_with("failpoint") {
                eprintln!("dagmq: {text}: aborting");
                std::process::abort();
            }
            previous(info);
        }));
        tracing::warn!("fail points armed: {}", std::env::var("FAILPOINTS").unwrap_or_default());
        Ok(())
    }
    #[cfg(not(feature = "failpoints"))]
    Err("FAILPOINTS is set, but this build has no fail points (build with --features failpoints)".to_string())
}

//! The shipped `dagmq` binary: DAG files from a directory, the builtin Rust tasks.

fn main() -> std::process::ExitCode {
    dagmq::App::new().main()
}

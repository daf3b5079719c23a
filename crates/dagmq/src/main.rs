//! The shipped `dagmq` binary: DAG files from a directory, the builtin Rust tasks.

/// mimalloc instead of the system allocator: a no-op task spent a fifth of its CPU time in
/// glibc's malloc and free (BENCHMARKS.md, round 2).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    dagmq::App::new().main()
}

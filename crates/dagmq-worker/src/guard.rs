//! A guard process between the worker and each command task, so that no task process outlives
//! its worker, even one killed with SIGKILL.
//!
//! Command tasks run in a process group of their own (so a stop reaches everything they
//! start). Without a guard, a worker that dies leaves that group running: a second copy of the
//! try would then run beside the first once the scheduler requeues it. So the worker's direct
//! child is a guard: forked after the process group is set, it forks again; the grandchild
//! execs the task, the guard stays behind, holding only the read end of the worker's lifeline,
//! a pipe whose write end only the worker keeps. The guard waits for whichever comes first:
//! - the task ends: the guard exits with the task's status (or dies of the same signal), so
//!   the worker sees the task's own outcome;
//! - the lifeline breaks (the worker died, however): the guard kills the whole group.
//!
//! The guard ignores SIGTERM, SIGINT and SIGHUP, so a stop (SIGTERM to the group) reaches the
//! task and the guard reports how the task took it; SIGKILL to the group ends both.
//! Everything the guard does between fork and exit is an async-signal-safe system call.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// The worker's lifeline: both ends close on exec, so task processes never hold it.
struct Lifeline {
    /// Held by guards.
    read: OwnedFd,
    /// Held by the worker process alone, for its whole life.
    _write: OwnedFd,
}

static LIFELINE: OnceLock<Result<Lifeline, String>> = OnceLock::new();

/// The read end of this process's lifeline, created on first use.
fn lifeline() -> io::Result<i32> {
    let lifeline = LIFELINE.get_or_init(|| {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        let done = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        if done != 0 {
            return Err(io::Error::last_os_error().to_string());
        }
        // SAFETY: both descriptors were just opened by pipe2 and are owned by nothing else.
        let (read, write) = unsafe {
            (
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
            )
        };
        Ok(Lifeline { read, _write: write })
    });
    match lifeline {
        Ok(lifeline) => Ok(lifeline.read.as_raw_fd()),
        Err(err) => Err(io::Error::other(format!("creating the worker's lifeline: {err}"))),
    }
}

/// Makes `command` start behind a guard (see the module docs). Call after `process_group(0)`.
pub(crate) fn guard(command: &mut tokio::process::Command) -> io::Result<()> {
    let read = lifeline()?;
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (fork, signal, close_range/close, syscall, poll, read, waitpid, kill, _exit);
    // it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            let task = libc::fork();
            if task < 0 {
                return Err(io::Error::last_os_error());
            }
            if task == 0 {
                // The task: goes on to exec, in the group the guard leads.
                return Ok(());
            }
            stand_guard(task, read)
        });
    }
    Ok(())
}

/// The guard's life; never returns.
unsafe fn stand_guard(task: libc::pid_t, lifeline: i32) -> ! {
    // SAFETY (whole function): only async-signal-safe system calls on plain integers and stack
    // buffers, in a single-threaded process that never returns to Rust code after this.
    unsafe {
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(signal, libc::SIG_IGN);
        }
        // Hold nothing but the lifeline: the task's pipes then close when the task's
        // processes close them, and the exec error pipe of the worker's spawn is released.
        if libc::syscall(libc::SYS_close_range, 0u32, (lifeline - 1).max(0) as u32, 0u32) != 0 || lifeline == 0 {
            for fd in 0..lifeline {
                libc::close(fd);
            }
        }
        if libc::syscall(libc::SYS_close_range, (lifeline + 1) as u32, u32::MAX, 0u32) != 0 {
            for fd in (lifeline + 1)..4096 {
                libc::close(fd);
            }
        }
        let pidfd = libc::syscall(libc::SYS_pidfd_open, task, 0) as i32;
        loop {
            let mut fds = [
                libc::pollfd { fd: lifeline, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 },
            ];
            let (count, timeout) = if pidfd >= 0 { (2, -1) } else { (1, 100) };
            libc::poll(fds.as_mut_ptr(), count, timeout);
            if fds[0].revents != 0 {
                let mut byte = 0u8;
                if libc::read(lifeline, (&raw mut byte).cast(), 1) <= 0 {
                    // The worker is gone: so is everything it started.
                    libc::kill(-libc::getpgrp(), libc::SIGKILL);
                    libc::_exit(137);
                }
            }
            let mut status = 0;
            let flags = if pidfd >= 0 && fds[1].revents != 0 { 0 } else { libc::WNOHANG };
            if libc::waitpid(task, &mut status, flags) == task {
                if libc::WIFSIGNALED(status) {
                    let signal = libc::WTERMSIG(status);
                    libc::signal(signal, libc::SIG_DFL);
                    libc::kill(libc::getpid(), signal);
                    libc::_exit(128 + signal);
                }
                libc::_exit(libc::WEXITSTATUS(status));
            }
        }
    }
}

/// Kills every process of group `pgid` (a task's leftovers once it ended or was abandoned).
pub(crate) fn kill_group(pgid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid)
        && pgid > 0
    {
        // SAFETY: kill takes plain integers; a group that no longer exists answers ESRCH.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

//! Standard output that never panics. `print!` panics when stdout is closed (`redbuckets demo |
//! head -2`); here a write that fails marks stdout closed, the command stops at its next step
//! as it would on Ctrl-C, and `main` exits 0 without a word, as `head`'s readers expect.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout failed: nobody reads us any more.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Stdout is closed: the error that ends a command quietly (exit 0).
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes `text` to stdout and flushes it.
pub fn print(text: &str) -> Result<(), StdoutClosed> {
    if closed() {
        return Err(StdoutClosed);
    }
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(_) => {
            CLOSED.store(true, Ordering::Relaxed);
            Err(StdoutClosed)
        }
    }
}

/// Writes `line` and a newline to stdout.
pub fn println(line: &str) -> Result<(), StdoutClosed> {
    print(&format!("{line}\n"))
}

/// Whether a write to stdout has failed.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Whether stdout's reader has gone, found out without writing: a command that writes only when
/// something changes (`watch`) would otherwise wait for a change to learn that `head` is done.
/// On unix, `poll(2)` reports an error (or a hang-up) on a pipe whose read end is closed.
pub fn reader_gone() -> bool {
    if closed() {
        return true;
    }
    #[cfg(unix)]
    {
        let mut fd = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a zero timeout; poll only writes `revents`.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        if ready == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            CLOSED.store(true, Ordering::Relaxed);
            return true;
        }
    }
    false
}

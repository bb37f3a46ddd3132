//! Standard output for log lines, buffered.
//!
//! Rust's standard output is line-buffered: one `write` system call per log line, and
//! with one line per gRPC call that is thousands of system calls a second under load.
//! Lines go into a 64 KiB buffer instead, flushed by a background thread every 100 ms,
//! when full, and at once for WARN and ERROR lines, so a problem is never held back. A
//! crash loses at most the last 100 ms of INFO lines; the state they describe is in the
//! database and the metrics.

use std::io::{self, BufWriter, Stdout, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of log lines held before they are written out.
const BUFFER_BYTES: usize = 64 * 1024;
/// Longest a line waits in the buffer.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Cheap to clone; every clone writes into the same buffer.
#[derive(Clone)]
pub struct LogWriter {
    out: Arc<Mutex<BufWriter<Stdout>>>,
}

impl LogWriter {
    /// A writer over standard output, with its flushing thread.
    pub fn stdout() -> Self {
        let writer = LogWriter { out: Arc::new(Mutex::new(BufWriter::with_capacity(BUFFER_BYTES, io::stdout()))) };
        let weak = Arc::downgrade(&writer.out);
        let _ = std::thread::Builder::new().name("log-flush".into()).spawn(move || loop {
            std::thread::sleep(FLUSH_INTERVAL);
            let Some(out) = weak.upgrade() else { return };
            let _ = lock(&out).flush();
        });
        writer
    }

    /// Writes out whatever is buffered (before the process exits).
    pub fn flush(&self) {
        let _ = lock(&self.out).flush();
    }
}

/// A poisoned lock only means a thread panicked while writing a line; the buffer is
/// still a buffer.
fn lock(out: &Mutex<BufWriter<Stdout>>) -> MutexGuard<'_, BufWriter<Stdout>> {
    out.lock().unwrap_or_else(|e| e.into_inner())
}

/// One line's access to the buffer.
pub struct LineWriter<'a> {
    out: MutexGuard<'a, BufWriter<Stdout>>,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if self.urgent {
            let _ = self.out.flush();
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { out: lock(&self.out), urgent: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter { out: lock(&self.out), urgent: *meta.level() <= Level::WARN }
    }
}

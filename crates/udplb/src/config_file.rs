//! Reading the configuration file without letting the file system stall udplb: the read
//! ([`udplb_config::load`], which only reads regular files of bounded size) runs on a thread of
//! its own, and udplb stops waiting for it after [`READ_TIMEOUT`] (a hung network mount, say).
//!
//! Owns: the timeout and the thread of each read. Must not: run a read on an async thread.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use udplb_config::{Config, ConfigError, ConfigErrors, Positions};

/// How long a read of the configuration file (with the checks that go with it) may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The error of a read given up after `timeout`, as a file error.
fn timed_out(path: &Path, timeout: Duration) -> ConfigError {
    ConfigError {
        file: path.display().to_string(),
        line: 1,
        column: 1,
        key: "(file)".into(),
        message: format!(
            "cannot read: no answer from the file system after {}",
            humantime::format_duration(timeout)
        ),
    }
}

/// [`udplb_config::load_with_positions`] on a thread of its own, given up after
/// [`READ_TIMEOUT`]. For `run` and `check`, before any other thread exists: the reading thread
/// has ended when this returns a result (privileges are dropped while udplb has one thread).
pub fn load(path: &Path) -> Result<(Config, Positions), ConfigErrors> {
    let (tx, rx) = std::sync::mpsc::channel();
    let file = path.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("udplb-config".into())
        .spawn(move || {
            let _ = tx.send(udplb_config::load_with_positions(&file));
        });
    let Ok(reader) = reader else {
        // No thread to be had: read here.
        return udplb_config::load_with_positions(path);
    };
    match rx.recv_timeout(READ_TIMEOUT) {
        Ok(loaded) => {
            let _ = reader.join();
            loaded
        }
        Err(_) => Err(ConfigErrors {
            errors: vec![timed_out(path, READ_TIMEOUT)],
        }),
    }
}

/// Reads (with whatever checks go with them) run one at a time on tokio's blocking threads,
/// each given up after a timeout; while one given up has still not returned, the next is
/// refused at once rather than left to pile up behind it.
pub struct Reads {
    timeout: Duration,
    /// A read is running (or stuck) on a blocking thread.
    busy: Arc<AtomicBool>,
}

impl Reads {
    pub fn new(timeout: Duration) -> Reads {
        Reads {
            timeout,
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs `read` of `path` off the async threads; `Err` with the file error on a timeout.
    pub async fn run<T: Send + 'static>(
        &self,
        path: &Path,
        read: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(format!(
                "{}:1:1: (file): cannot read: an earlier read of the file has not returned yet \
                 (is the file system stalled?)",
                path.display()
            ));
        }
        let busy = Arc::clone(&self.busy);
        let work = tokio::task::spawn_blocking(move || {
            let result = read();
            busy.store(false, Ordering::Release);
            result
        });
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("{}:1:1: (file): cannot read: {e}", path.display())),
            Err(_) => Err(timed_out(path, self.timeout).to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read that does not return is given up after the timeout, and the next read is
    /// refused while it is stuck; once it returns, reads go through again.
    #[tokio::test]
    async fn a_stuck_read_is_given_up_and_not_piled_up() {
        let reads = Reads::new(Duration::from_millis(100));
        let path = Path::new("/etc/udplb/udplb.toml");
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let error = reads
            .run(path, move || {
                let _ = stuck.recv();
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            error,
            "/etc/udplb/udplb.toml:1:1: (file): cannot read: no answer from the file system \
             after 100ms"
        );
        let error = reads.run(path, || Ok(())).await.unwrap_err();
        assert!(error.contains("has not returned yet"), "{error}");
        release.send(()).unwrap();
        let mut ok = false;
        for _ in 0..100 {
            if reads.run(path, || Ok(())).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok, "reads stayed refused after the stuck one returned");
        assert_eq!(reads.run(path, || Ok(7)).await, Ok(7));
    }
}

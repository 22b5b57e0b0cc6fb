//! Watches the manifests directory and rescans it after a burst of changes settles.

use std::time::Duration;

use notify::Watcher as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::file::{FileSource, Scan};

/// How long to wait for a burst of file events to settle before rescanning.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    /// Rescan once no event arrived for this long.
    pub quiet: Duration,
    /// ...but never wait longer than this after the first event.
    pub max_delay: Duration,
    /// Rescan this often even without events (file systems where inotify sees nothing).
    pub resync: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        // Editors write a file in several steps within a few ms; 100 ms of quiet keeps the
        // end-to-end delay well under the 1 s promise even at max_delay.
        Debounce {
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            resync: Duration::from_secs(5),
        }
    }
}

/// Runs until `shutdown` turns true, calling `on_scan` after every rescan that succeeded.
/// The caller has already done the initial scan.
pub async fn watch_dir(
    mut source: FileSource,
    debounce: Debounce,
    mut on_scan: impl FnMut(Scan) + Send,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only content changes count: reading the files during a scan produces access (and
        // possibly atime) events, and reacting to those would rescan forever.
        use notify::EventKind as E;
        use notify::event::ModifyKind;
        let changed = event.is_ok_and(|e| match e.kind {
            E::Modify(ModifyKind::Metadata(_)) | E::Access(_) | E::Other => false,
            E::Create(_) | E::Modify(_) | E::Remove(_) | E::Any => true,
        });
        if changed {
            // A full channel already means "rescan pending".
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(source.dir(), notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dir = %source.dir().display(), resync = ?debounce.resync,
                "cannot watch the manifests directory; falling back to periodic rescans");
            None
        }
    };
    let mut resync = tokio::time::interval(debounce.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = resync.tick() => {}
            Some(()) = rx.recv() => {
                let deadline = Instant::now() + debounce.max_delay;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(debounce.quiet) => break,
                        _ = tokio::time::sleep_until(deadline) => break,
                        Some(()) = rx.recv() => {}
                    }
                }
            }
        }
        match source.scan() {
            Ok(scan) => on_scan(scan),
            Err(e) => {
                tracing::error!(error = %e, dir = %source.dir().display(), "cannot read the manifests directory")
            }
        }
    }
}

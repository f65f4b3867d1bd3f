//! The fsync threads of the writer.

use std::fs::File;
use std::sync::Arc;

/// Threads that fsync files side by side: each fsync takes a disk round
/// trip, and in series a group touching every partition waits for all of
/// them. The threads live as long as the writer (a thread started for
/// each fsync of each group cost about a tenth of the machine).
pub(super) struct Syncer {
    pub(super) jobs: std::sync::mpsc::Sender<SyncJob>,
}

pub(super) type SyncJob = (Arc<File>, std::sync::mpsc::Sender<std::io::Result<()>>);

/// fsyncs one group can run at once (the default partition count).
pub(super) const SYNC_THREADS: usize = 8;

impl Syncer {
    pub(super) fn start() -> Syncer {
        let (jobs, queue) = std::sync::mpsc::channel::<SyncJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for _ in 0..SYNC_THREADS {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name("embedded-log-sync".into())
                .spawn(move || {
                    loop {
                        // The writer is gone when the queue closes.
                        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((file, done)) = job else { break };
                        let _ = done.send(file.sync_data());
                    }
                });
            if let Err(e) = spawned {
                // Fewer threads (or none: the writer syncs itself) is slower,
                // not wrong.
                tracing::warn!("cannot start an fsync thread for the embedded log: {e}");
            }
        }
        Syncer { jobs }
    }

    /// fsyncs `files`, at once where threads are free; the first error.
    pub(super) fn sync_all(&self, files: Vec<Arc<File>>) -> std::io::Result<()> {
        if let [file] = files.as_slice() {
            return file.sync_data();
        }
        let (done, results) = std::sync::mpsc::channel();
        let mut waiting = 0;
        for file in files {
            match self.jobs.send((file, done.clone())) {
                Ok(()) => waiting += 1,
                // No thread to take it: sync here.
                Err(std::sync::mpsc::SendError((file, _))) => file.sync_data()?,
            }
        }
        drop(done);
        let mut outcome = Ok(());
        for _ in 0..waiting {
            let result = results
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("an fsync thread stopped")));
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }
}

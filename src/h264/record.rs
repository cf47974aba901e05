//! Session recording (`--record-dir`): while a viewer session lasts, the console's shared
//! H.264 stream goes to a fragmented MP4 file named after the session (start time, VM,
//! protocol, peer, user). The recorder is one more subscriber of the stream (no second
//! encoding); it writes on the blocking pool, so a slow volume never slows a viewer, and if it
//! falls behind it resumes at the next key frame like any viewer.
//!
//! The directory is bounded by `max_bytes`: before a file starts and as it grows, the oldest
//! other recordings are removed; when the current file alone would pass the bound, recording
//! of it stops with a warning. The volume is never filled.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Video;
use super::mp4::{TIMESCALE, fragment, init_segment};

/// Where recordings go and how much they may take.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// Starts recordings of one console.
#[derive(Debug, Clone)]
pub struct Recorder {
    cfg: Arc<RecordConfig>,
    video: Video,
}

/// Stops its recording when dropped (the file stays, complete up to its last picture).
#[derive(Debug)]
pub struct Recording {
    stop: CancellationToken,
    pub path: PathBuf,
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `text` with everything but letters, digits, `.` and `-` turned into `-` (file-name safe).
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

impl Recorder {
    pub fn new(cfg: RecordConfig, video: Video) -> Self {
        Self {
            cfg: Arc::new(cfg),
            video,
        }
    }

    /// Records until the returned handle is dropped. `fields` name the file, in order
    /// (e.g. start time, VM, protocol, peer, user). Must be called inside a tokio runtime.
    pub fn start(&self, fields: &[&str]) -> Recording {
        let name: Vec<String> = fields
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| clean(f))
            .collect();
        let path = self.cfg.dir.join(format!("{}.mp4", name.join("_")));
        let stop = CancellationToken::new();
        tokio::spawn(run(
            Arc::clone(&self.cfg),
            self.video.subscribe(),
            path.clone(),
            stop.clone(),
        ));
        Recording { stop, path }
    }
}

/// The open file and where the stream stands in it.
struct Output {
    file: File,
    written: u64,
    seq: u32,
    /// The picture waiting for its duration (the next picture's arrival).
    pending: Option<(Arc<super::Frame>, u64)>,
    size: (u32, u32),
}

async fn run(
    cfg: Arc<RecordConfig>,
    mut sub: super::Subscription,
    path: PathBuf,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut out: Option<Output> = None;
    let mut blocked = false;
    loop {
        let frame = tokio::select! {
            f = sub.next() => f,
            _ = stop.cancelled() => None,
        };
        let now = started.elapsed().as_millis() as u64;
        let Some(frame) = frame else {
            break;
        };
        if blocked {
            continue;
        }
        // A new size needs a new init segment: a new file would be needed; keep it simple and
        // end this one (the next session records the new size).
        if let Some(o) = &out
            && o.size != (frame.width, frame.height)
        {
            info!(path = %path.display(), "console size changed: recording ends");
            break;
        }
        let (cfg2, path2) = (Arc::clone(&cfg), path.clone());
        let job = tokio::task::spawn_blocking(move || -> Result<Option<Output>, String> {
            let mut o = match out {
                Some(o) => o,
                None => {
                    if !frame.key {
                        return Ok(None);
                    }
                    make_room(&cfg2.dir, &path2, cfg2.max_bytes, 0);
                    let init = init_segment(frame.width, frame.height, &frame.data)
                        .map_err(|e| e.to_string())?;
                    let mut file = OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .open(&path2)
                        .map_err(|e| format!("{}: {e}", path2.display()))?;
                    file.write_all(&init).map_err(|e| e.to_string())?;
                    Output {
                        file,
                        written: init.len() as u64,
                        seq: 0,
                        pending: None,
                        size: (frame.width, frame.height),
                    }
                }
            };
            if let Some((prev, at)) = o.pending.take() {
                write_picture(&mut o, &prev, at, now.saturating_sub(at).max(1))?;
            }
            o.pending = Some((frame, now));
            Ok(Some(o))
        });
        out = match job.await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                warn!(error = %e, path = %path.display(), "recording stopped");
                blocked = true;
                None
            }
            Err(_) => None,
        };
        if let Some(o) = &out
            && o.written > cfg.max_bytes
        {
            warn!(
                path = %path.display(),
                bytes = o.written,
                limit = cfg.max_bytes,
                "recording stopped: it alone reached --record-max-bytes"
            );
            blocked = true;
            out = None;
        } else if let Some(o) = &out
            && o.seq % 64 == 0
        {
            let (dir, p, max, w) = (cfg.dir.clone(), path.clone(), cfg.max_bytes, o.written);
            let _ = tokio::task::spawn_blocking(move || make_room(&dir, &p, max, w)).await;
        }
    }
    // The last picture lasts until now.
    if let Some(mut o) = out {
        let now = started.elapsed().as_millis() as u64;
        let _ = tokio::task::spawn_blocking(move || {
            if let Some((prev, at)) = o.pending.take() {
                let _ = write_picture(&mut o, &prev, at, now.saturating_sub(at).max(1));
            }
            let _ = o.file.sync_data();
        })
        .await;
        info!(path = %path.display(), "recording ended");
    }
}

fn write_picture(o: &mut Output, f: &super::Frame, at: u64, ms: u64) -> Result<(), String> {
    o.seq += 1;
    let duration = u32::try_from(ms * u64::from(TIMESCALE) / 1000).unwrap_or(u32::MAX);
    let frag = fragment(o.seq, at, duration, f.key, &f.data).map_err(|e| e.to_string())?;
    o.file.write_all(&frag).map_err(|e| e.to_string())?;
    o.written += frag.len() as u64;
    Ok(())
}

/// Removes the oldest recordings in `dir` (not `current`) until everything there plus
/// `current_bytes` fits `max`.
fn make_room(dir: &Path, current: &Path, max: u64, current_bytes: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path() != current && e.path().extension().is_some_and(|x| x == "mp4"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.1).sum::<u64>() + current_bytes;
    for (_, len, p) in files {
        if total <= max {
            break;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => {
                info!(path = %p.display(), bytes = len, "old recording removed (--record-max-bytes)");
                total -= len;
            }
            Err(e) => warn!(path = %p.display(), error = %e, "old recording not removed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_file_safe() {
        assert_eq!(clean("10.0.0.1:5000"), "10.0.0.1-5000");
        assert_eq!(clean("../../etc/passwd"), "..-..-etc-passwd");
        assert_eq!(clean("Grüße"), "Gr--e");
    }

    #[test]
    fn the_oldest_recordings_make_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            let p = dir.path().join(format!("{n}.mp4"));
            std::fs::write(&p, vec![0u8; 1000]).expect("write");
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            File::options()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_modified(t))
                .expect("mtime");
        }
        std::fs::write(dir.path().join("keep.txt"), b"x").expect("write");
        let current = dir.path().join("now.mp4");
        make_room(dir.path(), &current, 2500, 400);
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.contains(&"a.mp4".to_string()), "{left:?}");
        assert!(left.contains(&"b.mp4".to_string()) && left.contains(&"c.mp4".to_string()));
        assert!(
            left.contains(&"keep.txt".to_string()),
            "only recordings are removed"
        );
    }
}

//! Session recording (`--record-dir`): while a viewer session lasts, the console's shared
//! H.264 stream goes to a fragmented MP4 file named after the session (start time, VM,
//! protocol, peer, user). The recorder is one more subscriber of the stream (no second
//! encoding); it writes on the blocking pool, so a slow volume never slows a viewer, and if it
//! falls behind it resumes at the next key frame like any viewer. A picture is written once the
//! next one arrives (that fixes its duration) or after [`FLUSH`] of stillness, so a killed
//! sidecar loses at most that much; a still stretch longer than that is a gap in the media
//! timeline, which players fill with the last picture.
//!
//! The directory is bounded by `max_bytes`: before a file starts and as recordings grow, the
//! oldest finished recordings are removed; recordings still being written are never removed
//! (an unlinked open file would keep its space); when they alone would pass the bound, the one
//! growing stops with a warning. The volume is never filled.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::mp4::{TIMESCALE, fragment, init_segment};
use super::{Frame, Video};

/// A picture still on screen this long is written (with the time so far as its duration).
pub const FLUSH: Duration = Duration::from_secs(1);

/// Room kept for a new file's init segment (SPS, PPS and the track's boxes: under 1 KiB).
const INIT_ROOM: u64 = 4096;

/// Where recordings go and how much they may take.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl RecordConfig {
    /// Creates the directory if needed and checks that files can be made there, so a bad
    /// `--record-dir` fails at start-up rather than at the first session.
    pub fn prepare(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let probe = self.dir.join(".vdi-record-probe");
        File::create(&probe)?;
        std::fs::remove_file(&probe)
    }
}

/// Recordings being written, and their sizes so far.
type Active = Arc<Mutex<HashMap<PathBuf, u64>>>;

fn lock(a: &Active) -> std::sync::MutexGuard<'_, HashMap<PathBuf, u64>> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts recordings of one console.
#[derive(Debug, Clone)]
pub struct Recorder {
    cfg: Arc<RecordConfig>,
    video: Video,
    active: Active,
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
            active: Arc::default(),
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
        let path = self.claim(&name.join("_"));
        let stop = CancellationToken::new();
        let job = Job {
            cfg: Arc::clone(&self.cfg),
            active: Arc::clone(&self.active),
            base: path.clone(),
            path: path.clone(),
            part: 1,
        };
        tokio::spawn(job.run(self.video.subscribe(), stop.clone()));
        Recording { stop, path }
    }

    /// A file name in the directory that neither exists nor is being written: `base.mp4`, else
    /// `base-2.mp4`, … (two sessions from one peer in the same second).
    fn claim(&self, base: &str) -> PathBuf {
        let mut active = lock(&self.active);
        let mut n = 1;
        loop {
            let name = if n == 1 {
                format!("{base}.mp4")
            } else {
                format!("{base}-{n}.mp4")
            };
            let p = self.cfg.dir.join(name);
            if !active.contains_key(&p) && !p.exists() {
                active.insert(p.clone(), 0);
                return p;
            }
            n += 1;
        }
    }
}

/// The open file and where the stream stands in it.
struct Output {
    file: File,
    written: u64,
    seq: u32,
    /// The picture waiting for its duration (the next picture's arrival, or [`FLUSH`]), and
    /// when it arrived (ms since the recording started).
    pending: Option<(Arc<Frame>, u64)>,
    size: (u32, u32),
    /// What the finished recordings in the directory took when last counted.
    others: u64,
}

impl Output {
    fn open(path: &Path, key: &Frame) -> Result<Self, String> {
        let init = init_segment(key.width, key.height, &key.data).map_err(|e| e.to_string())?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        file.write_all(&init).map_err(|e| e.to_string())?;
        Ok(Self {
            file,
            written: init.len() as u64,
            seq: 0,
            pending: None,
            size: (key.width, key.height),
            others: 0,
        })
    }

    /// The waiting picture as a fragment lasting until `now`.
    fn take_pending(&mut self, now: u64) -> Result<Option<Vec<u8>>, String> {
        let Some((f, at)) = self.pending.take() else {
            return Ok(None);
        };
        self.seq += 1;
        let ms = now.saturating_sub(at).max(1);
        let duration = u32::try_from(ms * u64::from(TIMESCALE) / 1000).unwrap_or(u32::MAX);
        fragment(self.seq, at, duration, f.key, &f.data)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.file.write_all(bytes).map_err(|e| e.to_string())?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// What one recording does next.
enum Step {
    Picture(Arc<Frame>),
    Still,
    End,
}

/// One session's recording: `path` is the file being written (`base`, then `base-part2.mp4`
/// and so on after a console resize, which needs a new init segment).
struct Job {
    cfg: Arc<RecordConfig>,
    active: Active,
    base: PathBuf,
    path: PathBuf,
    part: u32,
}

impl Job {
    async fn run(mut self, mut sub: super::Subscription, stop: CancellationToken) {
        let started = Instant::now();
        let mut out: Option<Output> = None;
        loop {
            let waiting = out.as_ref().is_some_and(|o| o.pending.is_some());
            let step = tokio::select! {
                f = sub.next() => f.map_or(Step::End, Step::Picture),
                _ = stop.cancelled() => Step::End,
                _ = tokio::time::sleep(FLUSH), if waiting => Step::Still,
            };
            let now = started.elapsed().as_millis() as u64;
            let frame = match step {
                Step::End => break,
                Step::Still => None,
                Step::Picture(f) => Some(f),
            };
            if let (Some(o), Some(f)) = (&out, &frame)
                && o.size != (f.width, f.height)
            {
                // A new size needs a new init segment: close this part, the next key frame
                // (the stream makes one for the new size) opens the next.
                self.finish(out.take(), now).await;
                self.part += 1;
                self.path = part_path(&self.base, self.part);
                lock(&self.active).insert(self.path.clone(), 0);
                info!(path = %self.path.display(), "console size changed: recording goes on in a new file");
            }
            let (cfg, path) = (Arc::clone(&self.cfg), self.path.clone());
            let active = Arc::clone(&self.active);
            let job =
                tokio::task::spawn_blocking(move || write(&cfg, &active, &path, out, frame, now));
            match job.await {
                Ok(Ok(o)) => out = o,
                Ok(Err(e)) => {
                    warn!(path = %self.path.display(), error = %e, "recording stopped");
                    out = None;
                    break;
                }
                Err(_) => {
                    out = None;
                    break;
                }
            }
        }
        let now = started.elapsed().as_millis() as u64;
        self.finish(out, now).await;
        // Stop the stream's encoder if we were its last subscriber.
        drop(sub);
    }

    /// Writes what waits (within the bound), syncs and closes `out`; the file stops counting
    /// as active.
    async fn finish(&self, out: Option<Output>, now: u64) {
        if out.is_some() {
            let (cfg, path) = (Arc::clone(&self.cfg), self.path.clone());
            let active = Arc::clone(&self.active);
            let _ = tokio::task::spawn_blocking(move || {
                match write(&cfg, &active, &path, out, None, now) {
                    Ok(Some(o)) => {
                        let _ = o.file.sync_data();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "last picture not recorded")
                    }
                }
            })
            .await;
            info!(path = %self.path.display(), "recording ended");
        }
        lock(&self.active).remove(&self.path);
    }
}

fn part_path(base: &Path, part: u32) -> PathBuf {
    let stem = base
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    base.with_file_name(format!("{stem}-part{part}.mp4"))
}

/// One step of a recording on the blocking pool: opens the file at the first key frame, writes
/// the waiting picture when the next arrives (or when `frame` is `None`: still), and keeps the
/// directory within its bound. `Err` stops the recording.
fn write(
    cfg: &RecordConfig,
    active: &Active,
    path: &Path,
    out: Option<Output>,
    frame: Option<Arc<Frame>>,
    now: u64,
) -> Result<Option<Output>, String> {
    let mut o = match (out, &frame) {
        (Some(o), _) => o,
        (None, Some(f)) if f.key => {
            let active = lock(active);
            let others = make_room(&cfg.dir, &active, cfg.max_bytes.saturating_sub(INIT_ROOM));
            if others + active.values().sum::<u64>() + INIT_ROOM > cfg.max_bytes {
                return Err(format!(
                    "no room for a new recording within --record-max-bytes {}",
                    cfg.max_bytes
                ));
            }
            drop(active);
            let mut o = Output::open(path, f)?;
            o.others = others;
            o
        }
        (None, _) => return Ok(None),
    };
    if let Some(frag) = o.take_pending(now)? {
        let mut held = lock(active);
        held.insert(path.to_path_buf(), o.written);
        let need = |others: u64, active: &HashMap<PathBuf, u64>| {
            others + active.values().sum::<u64>() + frag.len() as u64
        };
        // Nothing is written that would take the directory past the bound: finished
        // recordings make room first (counted again only when needed), then this one stops.
        if need(o.others, &held) > cfg.max_bytes {
            o.others = make_room(
                &cfg.dir,
                &held,
                cfg.max_bytes.saturating_sub(frag.len() as u64),
            );
            if need(o.others, &held) > cfg.max_bytes {
                return Err(format!(
                    "recordings take {} bytes, the next picture would pass --record-max-bytes {}",
                    need(o.others, &held) - frag.len() as u64,
                    cfg.max_bytes
                ));
            }
        }
        drop(held);
        o.append(&frag)?;
        lock(active).insert(path.to_path_buf(), o.written);
    }
    o.pending = frame.map(|f| (f, now));
    Ok(Some(o))
}

/// Removes the oldest finished recordings in `dir` until they and the `active` ones (with their
/// sizes so far) fit `max`; returns what the finished ones left take.
fn make_room(dir: &Path, active: &HashMap<PathBuf, u64>, max: u64) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| !active.contains_key(&e.path()))
        .filter(|e| e.path().extension().is_some_and(|x| x == "mp4"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then_some(())?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    files.sort();
    let recording: u64 = active.values().sum();
    let mut left: u64 = files.iter().map(|f| f.1).sum();
    for (_, len, p) in files {
        if left + recording <= max {
            break;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => {
                info!(path = %p.display(), bytes = len, "old recording removed (--record-max-bytes)");
                left -= len;
            }
            Err(e) => warn!(path = %p.display(), error = %e, "old recording not removed"),
        }
    }
    left
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
        let active = HashMap::from([(dir.path().join("now.mp4"), 400)]);
        make_room(dir.path(), &active, 2500);
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

//! A private PulseAudio server for the RDP sound tests, started here and killed by PID: FreeRDP
//! plays what it receives into a null sink whose monitor we record (these machines have no sound
//! card), and takes its microphone from another null sink's monitor, into which we play a sine
//! of a known frequency in real time (PulseAudio's own sine source hands out seconds at once).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::rdp::{PASSWORD, USER};
use super::x11::Xvfb;
use super::{Proc, wait_until};

/// The sink FreeRDP plays into and the source it records from.
pub const SINK: &str = "rdp_out";
pub const MIC: &str = "rdp_mic.monitor";

pub struct Pulse {
    _sine: Option<Proc>,
    _daemon: Proc,
    pub dir: tempfile::TempDir,
}

impl Pulse {
    /// A server with a 48 kHz null sink and a sine source at `mic_hz`.
    pub fn start(mic_hz: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("native");
        let child = Command::new("pulseaudio")
            .args([
                "-n",
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--system=no",
                "-L",
                &format!(
                    "module-native-protocol-unix socket={} auth-anonymous=1",
                    socket.display()
                ),
                "-L",
                &format!("module-null-sink sink_name={SINK} rate=48000"),
                "-L",
                "module-null-sink sink_name=rdp_mic rate=48000",
            ])
            .envs(env_in(dir.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pulseaudio (install pulseaudio)");
        let daemon = Proc {
            child,
            name: "pulseaudio",
        };
        let mut pulse = Self {
            _sine: None,
            _daemon: daemon,
            dir,
        };
        assert!(
            wait_until(Duration::from_secs(20), || pulse
                .command("pactl")
                .args(["list", "short", "sinks"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(SINK))),
            "pulseaudio did not come up"
        );
        // A minute of the sine, played at real-time pace with a short buffer.
        let raw = pulse.dir.path().join("sine.raw");
        let sine: Vec<u8> = (0..48_000 * 60)
            .flat_map(|i| {
                let t = f64::from(i) / 48_000.0;
                let v = (t * f64::from(mic_hz) * std::f64::consts::TAU).sin() * 12_000.0;
                (v as i16).to_le_bytes()
            })
            .collect();
        std::fs::write(&raw, sine).expect("sine");
        let child = pulse
            .command("pacat")
            .args([
                "--device=rdp_mic",
                "--raw",
                "--format=s16le",
                "--rate=48000",
                "--channels=1",
                "--latency-msec=20",
            ])
            .arg(&raw)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pacat (install pulseaudio-utils)");
        pulse._sine = Some(Proc {
            child,
            name: "pacat",
        });
        pulse
    }

    /// Environment that points a client at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        env_in(self.dir.path())
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env());
        c
    }

    /// FreeRDP 3 on `x` with this server as its sound system, logged in to our RDP server on
    /// `port` with the test credentials; its stderr goes to `log`.
    pub fn freerdp(&self, port: u16, x: &Xvfb, extra: &[&str], log: &Path) -> Proc {
        let child = self
            .command("xfreerdp3")
            .arg(format!("/v:127.0.0.1:{port}"))
            .arg(format!("/u:{USER}"))
            .arg(format!("/p:{PASSWORD}"))
            .args(["/cert:ignore", "-gfx", "/log-level:INFO"])
            .args(extra)
            .env("DISPLAY", &x.display)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("xfreerdp3");
        Proc {
            child,
            name: "xfreerdp3",
        }
    }

    /// Records what is played into [`SINK`] as raw s16le mono 48 kHz into `path`.
    pub fn record(&self, path: &Path) -> Proc {
        let child = self
            .command("parec")
            .arg(format!("--device={SINK}.monitor"))
            .args([
                "--raw",
                "--format=s16le",
                "--rate=48000",
                "--channels=1",
                "--latency-msec=20",
            ])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("parec (install pulseaudio-utils)");
        Proc {
            child,
            name: "parec",
        }
    }
}

fn env_in(dir: &Path) -> Vec<(&'static str, String)> {
    let d = dir.display().to_string();
    vec![
        ("PULSE_SERVER", format!("unix:{d}/native")),
        ("XDG_RUNTIME_DIR", d.clone()),
        ("HOME", d),
    ]
}

/// Raw s16le mono samples as floats.
pub fn samples(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect()
}

/// The longest run of 20 ms blocks (48 kHz) whose pitch is within 10% of `hz`: the recording is
/// not a timeline (the null sink's monitor skips the time nothing plays), so the tone is found
/// by its pitch.
pub fn pitch_run(pcm: &[f32], hz: u32) -> &[f32] {
    const BLOCK: usize = 960;
    // Zero crossings a block of `hz` has: two per period.
    let expected = f64::from(hz) * 2.0 * BLOCK as f64 / 48000.0;
    let (lo, hi) = (
        (expected * 0.9).floor() as usize,
        (expected * 1.1).ceil() as usize,
    );
    let crossings = |b: &[f32]| {
        b.windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count()
    };
    let is_tone = |b: &[f32]| (lo..=hi).contains(&crossings(b)) && b.iter().any(|v| v.abs() > 0.1);
    let (mut best, mut run) = ((0, 0), (0, 0));
    for (k, b) in pcm.chunks_exact(BLOCK).enumerate() {
        run = if is_tone(b) {
            (if run.1 == 0 { k } else { run.0 }, run.1 + 1)
        } else {
            (k, 0)
        };
        if run.1 > best.1 {
            best = run;
        }
    }
    &pcm[best.0 * BLOCK..(best.0 + best.1) * BLOCK]
}

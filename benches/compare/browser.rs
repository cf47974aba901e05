//! Browser rows: what noVNC gets from our VNC server when the browser can decode H.264 (Open
//! H.264 listed before Tight) against noVNC's Tight+JPEG alone, in the same scene, same round.
//! Both are our server; QEMU's VNC has no H.264 to compare with.

use std::time::Duration;

use anyhow::Result;

use crate::client::{self, Enc, Run};
use crate::stats::{Row, Table, median};
use crate::{Opts, Rig};

pub async fn rows(rig: &mut Rig, opts: &Opts, (w, h): (u32, u32), table: &mut Table) -> Result<()> {
    let size = &format!("{w}x{h}");
    let window = Duration::from_secs_f64(opts.secs);
    let mut video = (0.0, 0.0);
    let scenes: &[&str] = if opts.full {
        &["video", "scroll", "desktop"]
    } else {
        &["video"]
    };
    for &scene in scenes {
        let (mut h264, mut tight) = (Vec::new(), Vec::new());
        for round in 0..opts.rounds {
            let (length, base) = rig
                .start_scene(scene, window, 3, Duration::from_secs(6))
                .await?;
            let order = if round % 2 == 0 {
                [Enc::H264, Enc::NoVnc]
            } else {
                [Enc::NoVnc, Enc::H264]
            };
            for enc in order {
                let run = client::measure(
                    client::Server {
                        addr: rig.ours,
                        pid: rig.ours_pid,
                        mine: true,
                    },
                    enc,
                    window,
                    1,
                    rig.qemu_pid,
                    &base,
                )
                .await?;
                if std::env::var_os("VDI_BENCH_DEBUG").is_some() {
                    eprintln!("browser {scene} {enc:?}: {run:?}");
                }
                if enc == Enc::H264 {
                    &mut h264
                } else {
                    &mut tight
                }
                .push(run);
            }
            rig.finish_scene(length).await?;
        }
        let med = |v: &[Run], f: fn(&Run) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        let mut row = |what: &str, unit, higher, f: fn(&Run) -> f64| {
            let (a, b) = (med(&h264, f), med(&tight, f));
            table.browser(
                Row::other(format!("{what}, {scene}, {size}"), unit, higher),
                a,
                b,
            );
            (a, b)
        };
        let fps = row("fps", "fps", true, Run::fps);
        let kib = row("KiB per update", "KiB", false, Run::kib_per_update);
        row("CPU per 1000 updates", "s", false, Run::cpu_per_1000);
        // How much of the window the server spent in H.264 (0 for Tight alone, by design).
        row("share of updates as H.264", "%", false, |r| {
            100.0 * r.h264_updates / r.updates.max(1.0)
        });
        if scene == "video" {
            video = (kib.0 / kib.1.max(1e-9), fps.0 / fps.1.max(1e-9));
        }
    }
    table.target(
        format!("browser video: H.264 KiB per update < Tight+JPEG's, at >= 0.9x its fps, {size}"),
        video.0 < 1.0 && video.1 >= 0.9,
        format!("bytes {:.2}x, fps {:.2}x", video.0, video.1),
    );
    Ok(())
}

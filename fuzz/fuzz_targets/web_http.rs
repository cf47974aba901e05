//! The browser listener from a hostile peer: HTTP/1.1 requests (the page, probes, the WebSocket
//! upgrade with its key and version checks), then WebSocket frames (masking, fragmentation,
//! control frames, sizes) whose payload reaches the real VNC server. Served by the real listener
//! on loopback; the connection must end on its own once the peer's input ends, and the listener
//! must keep answering.
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::vnc::VncConfig;
use vdi_sidecar::web::{StreamServer, WebConfig};

struct World {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let addr = rt.block_on(async {
            let desktop = common::desktop_with_frame(32, 24);
            let mut vnc = VncConfig::new(Arc::new(Auth::open()), "fuzz");
            vnc.handshake_timeout = Duration::from_millis(300);
            let vnc = Arc::new(vnc);
            let for_rfb = desktop.clone();
            let rfb: StreamServer = Arc::new(move |stream, peer| {
                let (cfg, desktop) = (Arc::clone(&vnc), for_rfb.clone());
                Box::pin(vdi_sidecar::vnc::server::serve_client(
                    stream, peer, cfg, desktop,
                ))
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let cfg = WebConfig {
                novnc: None,
                tls: None,
            };
            tokio::spawn(vdi_sidecar::web::run(
                listener,
                cfg,
                desktop,
                rfb,
                CancellationToken::new(),
            ));
            addr
        });
        World { rt, addr }
    })
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| fuzz(bytes));

/// One input.
pub fn fuzz(bytes: &[u8]) {
    let w = world();
    w.rt.block_on(async {
        let done = tokio::time::timeout(Duration::from_secs(3), async {
            let mut s = tokio::net::TcpStream::connect(w.addr)
                .await
                .expect("connect");
            let (mut rx, mut tx) = s.split();
            let send = async {
                let _ = tx.write_all(bytes).await;
                let _ = tx.shutdown().await;
            };
            let drain = async {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = rx.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::join!(send, drain);
        })
        .await;
        assert!(
            done.is_ok(),
            "the connection did not end after the peer's input ended"
        );
    });
}

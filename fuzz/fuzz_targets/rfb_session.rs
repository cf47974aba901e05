//! A whole VNC connection from a hostile client: the bytes are what the client sends (version,
//! security choice, VeNCrypt sub-type and TLS records, VNC-auth response, ClientInit, then
//! messages), served by the real server over an in-memory pipe. The first byte picks the
//! server's security setup. The server must end every connection on its own (no hang) and
//! never panic; what it writes is drained as a client would.
// Built by cargo-fuzz (`--cfg fuzzing`) as a libFuzzer target; included by tests/fuzz_seeds.rs
// as a module whose `fuzz` replays the committed seeds in the ordinary test run.
#![cfg_attr(fuzzing, no_main)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vdi_sidecar::session::Desktop;
use vdi_sidecar::session::auth::Auth;
use vdi_sidecar::tls::{TlsIdentity, default_names};
use vdi_sidecar::vnc::VncConfig;
use vdi_sidecar::vnc::server::serve_client;

struct World {
    rt: tokio::runtime::Runtime,
    desktop: Desktop,
    configs: Vec<Arc<VncConfig>>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let desktop = rt.block_on(async { common::desktop_with_frame(64, 48) });
        let tls = TlsIdentity::generate(&default_names(&[])).expect("tls");
        let config = |auth: Auth, tls: Option<TlsIdentity>, require_tls: bool| {
            let mut c = VncConfig::new(Arc::new(auth), "fuzz");
            c.tls = tls;
            c.require_tls = require_tls;
            c.handshake_timeout = Duration::from_millis(300);
            Arc::new(c)
        };
        let configs = vec![
            config(Auth::open(), None, false),
            config(Auth::password("fuzzpass"), None, false),
            config(Auth::password("fuzzpass"), Some(tls.clone()), false),
            config(Auth::user_password("user", "fuzzpass"), Some(tls), true),
        ];
        World {
            rt,
            desktop,
            configs,
        }
    })
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|input: &[u8]| fuzz(input));

/// One input.
pub fn fuzz(input: &[u8]) {
    let Some((&pick, bytes)) = input.split_first() else {
        return;
    };
    let w = world();
    let cfg = Arc::clone(&w.configs[usize::from(pick) % w.configs.len()]);
    let peer: SocketAddr = ([10, 0, (pick >> 2) & 3, 1], 40_000).into();
    let desktop = w.desktop.clone();
    w.rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let session = tokio::spawn(serve_client(server, peer, cfg, desktop));
        let talk = async {
            let (mut rx, mut tx) = tokio::io::split(&mut client);
            let send = async {
                let _ = tx.write_all(bytes).await;
                let _ = tx.shutdown().await;
            };
            let mut sink = Vec::new();
            let drain = async {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = rx.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    sink.extend_from_slice(&chunk[..n.min(64)]);
                }
            };
            tokio::join!(send, drain);
        };
        // A session that outlives its client's end of input by this much is a hang.
        let done = tokio::time::timeout(Duration::from_secs(2), async {
            talk.await;
            let _ = session.await;
        })
        .await;
        assert!(
            done.is_ok(),
            "the session did not end after the client's input ended"
        );
    });
}

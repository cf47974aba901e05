//! Browser access: one HTTP(S) listener serving our page (noVNC's RFB client from npm, never
//! copied into the repository), the WebSocket that carries RFB into our VNC server, and the
//! Kubernetes probes `/healthz` and `/readyz`.

pub mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use futures_util::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::DuplexStream;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::services::ServeDir;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::net::{Io, accept_bounded};
use crate::session::Desktop;
use crate::session::budget::vnc_viewer_cost;
use crate::tls::TlsIdentity;

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
/// Largest WebSocket message or frame accepted from a browser (RFB client messages are small;
/// the largest legal one, a cut text, is bounded by the VNC server anyway).
const MAX_WS_MESSAGE: usize = 1 << 20;
/// Browser viewers served at once; more are answered 503.
pub const MAX_VIEWERS: usize = 64;
/// HTTP connections open at once (page loads, probes, WebSocket handshakes); more wait in the
/// kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// Time for a TLS handshake and for a request's headers (slow-loris guard).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one browser viewer's RFB byte stream (the WebSocket's payload) to its end. The
/// listeners' wiring plugs the VNC server in; this module never depends on it.
pub type StreamServer =
    Arc<dyn Fn(DuplexStream, SocketAddr) -> BoxFuture<'static, ()> + Send + Sync>;

/// What the web listener serves.
#[derive(Clone)]
pub struct WebConfig {
    /// noVNC's package directory (holds `core/rfb.js`); `None` or missing → an explanatory page.
    pub novnc: Option<PathBuf>,
    /// HTTPS when set (the browser then uses `wss://`).
    pub tls: Option<TlsIdentity>,
}

#[derive(Clone)]
struct AppState {
    rfb: StreamServer,
    desktop: Desktop,
    novnc_ok: bool,
    viewers: Arc<Semaphore>,
}

/// Serves HTTP(S) on `listener` until `stop`; WebSocket byte streams go to `rfb`.
pub async fn run(
    listener: TcpListener,
    cfg: WebConfig,
    desktop: Desktop,
    rfb: StreamServer,
    stop: CancellationToken,
) {
    let novnc_ok = cfg
        .novnc
        .as_ref()
        .is_some_and(|d| d.join("core/rfb.js").is_file());
    if !novnc_ok {
        warn!(dir = ?cfg.novnc, "noVNC assets not found: the page will explain how to get them (see README)");
    }
    let state = AppState {
        rfb,
        desktop,
        novnc_ok,
        viewers: Arc::new(Semaphore::new(MAX_VIEWERS)),
    };
    let mut app = Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/websockify", get(websocket))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if let Some(dir) = cfg.novnc.filter(|_| novnc_ok) {
        app = app.nest_service("/novnc", ServeDir::new(dir));
    }
    let app = app.with_state(state);
    let acceptor = cfg
        .tls
        .map(|t| tokio_rustls::TlsAcceptor::from(Arc::clone(&t.config)));
    if let Ok(addr) = listener.local_addr() {
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        info!(%addr, "web client at {scheme}://{addr}/");
    }
    serve_http(listener, app, acceptor, "web", stop).await;
}

/// Serves `/metrics` alone, in plain HTTP, on `listener` until `stop` (`--metrics`: for scrapers
/// inside the cluster, apart from the viewers' listener).
pub async fn run_metrics(listener: TcpListener, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let app = Router::new().route("/metrics", get(metrics));
    serve_http(listener, app, None, "metrics", stop).await;
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::global().render(),
    )
}

/// The accept loop of an HTTP(S) listener: connections bounded in number, TLS and request
/// headers bounded in time, each connection a task until it ends or `stop`.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    name: &'static str,
    stop: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((permit, tcp, peer)) = accept_bounded(&listener, &connections, &stop).await {
        let app = app.clone().layer(Extension(peer));
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let io: Box<dyn Io> = match acceptor {
                    Some(a) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
                        Ok(Ok(t)) => Box::new(t),
                        Ok(Err(e)) => {
                            debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!("TLS handshake timed out");
                            return;
                        }
                    },
                    None => Box::new(tcp),
                };
                let service = TowerToHyperService::new(app);
                let mut builder = Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT);
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .into_owned();
                tokio::select! {
                    r = conn => if let Err(e) = r { debug!(error = %e, "HTTP connection ended") },
                    () = stop.cancelled() => {}
                }
            }
            .instrument(info_span!("web", listener = name, %peer)),
        );
    }
}

async fn index(
    State(st): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    peer: Extension<SocketAddr>,
) -> Response {
    // Some clients open the WebSocket on `/` itself.
    if let Ok(ws) = ws {
        return upgrade(st, ws, peer.0);
    }
    if !st.novnc_ok {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(
                "<!doctype html><title>vdi-sidecar</title><h1>The browser client is not installed</h1>\
                 <p>This server has no noVNC assets. Run <code>npm install</code> in the \
                 project's <code>web/</code> directory (or use the sidecar image, which carries \
                 them) and start with <code>--web-root web/node_modules/@novnc/novnc</code>.</p>\
                 <p>VNC clients can still connect to the VNC port.</p>",
            ),
        )
            .into_response();
    }
    Html(INDEX).into_response()
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn websocket(
    State(st): State<AppState>,
    ws: WebSocketUpgrade,
    peer: Extension<SocketAddr>,
) -> Response {
    upgrade(st, ws, peer.0)
}

fn upgrade(st: AppState, ws: WebSocketUpgrade, peer: SocketAddr) -> Response {
    // The viewer's slot is held for the whole WebSocket session, not just the HTTP exchange.
    let Ok(slot) = Arc::clone(&st.viewers).try_acquire_owned() else {
        warn!(%peer, "browser refused: {MAX_VIEWERS} viewers already connected");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many viewers\n").into_response();
    };
    // The VNC session behind the socket is admitted (and counted) by the VNC server; a browser
    // that would be refused there is told here, as HTTP.
    let (w, h) = st.desktop.fb.size();
    if let Err(e) = st.desktop.budget.check(vnc_viewer_cost(w, h)) {
        warn!(%peer, "browser refused: {e}");
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
    }
    ws.protocols(["binary"])
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| {
            async move {
                let _slot = slot;
                info!("browser connected over WebSocket");
                (st.rfb)(ws::into_stream(socket), peer).await;
                info!("browser disconnected");
            }
            .instrument(info_span!("vnc-ws", %peer))
        })
}

/// Ready once QEMU's display is attached and a surface exists. Known problems (see
/// [`crate::health::Health`]) follow as "warning:" lines: missing audio leaves the desktop
/// usable, so it does not make us unready.
async fn readyz(State(st): State<AppState>) -> Response {
    let (w, h) = st.desktop.fb.size();
    let mut body = if st.desktop.fb.is_attached() && w > 0 && h > 0 {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for QEMU's display\n".to_owned(),
        )
    };
    for w in st.desktop.health.warnings() {
        body.1.push_str(&format!("warning: {w}\n"));
    }
    body.into_response()
}

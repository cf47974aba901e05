//! A WebSocket as the byte stream our RFB server reads and writes. Each binary message carries an
//! arbitrary slice of the RFB stream (noVNC, websockify); text frames are refused (close 1003).
//! The bridge is a bounded in-memory pipe, so a slow browser back-pressures the VNC connection
//! exactly like a slow TCP client does.

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tracing::debug;

/// Bytes in flight in each direction between the socket and the RFB connection.
const PIPE: usize = 256 * 1024;

/// Turns `ws` into a stream for the RFB server; the pumping tasks end with either side.
pub fn into_stream(ws: WebSocket) -> DuplexStream {
    let (rfb_side, ours) = tokio::io::duplex(PIPE);
    let (mut rd, mut wr) = tokio::io::split(ours);
    let (mut tx, mut rx) = ws.split();
    // Why the browser side ended, for the close frame the writer sends last.
    let verdict = std::sync::Arc::new(std::sync::Mutex::new(None::<(u16, &'static str)>));
    let reader_verdict = std::sync::Arc::clone(&verdict);
    tokio::spawn(async move {
        // Browser → RFB.
        let reason = loop {
            match rx.next().await {
                Some(Ok(Message::Binary(data))) => {
                    if wr.write_all(&data).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    break Some((close_code::UNSUPPORTED, "RFB needs binary frames"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {} // answered by the library
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) => {
                    debug!(error = %e, "WebSocket read failed");
                    break Some((close_code::PROTOCOL, "bad WebSocket frame"));
                }
            }
        };
        if let (Some(r), Ok(mut v)) = (reason, reader_verdict.lock()) {
            *v = Some(r);
        }
        // The RFB connection sees end-of-stream and finishes; the writer then closes.
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        // RFB → browser.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = Message::Binary(buf[..n].to_vec().into());
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
        let (code, reason) = verdict
            .lock()
            .ok()
            .and_then(|v| *v)
            .unwrap_or((close_code::NORMAL, ""));
        let _ = tx
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    });
    rfb_side
}

//! A browser's transport for test clients: a local TCP port whose connections are carried over a
//! WebSocket (`/websockify`, binary frames, masked as a browser masks them) to the web listener,
//! so the RFB client of `rfb.rs` can be a browser viewer unchanged.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | opcode];
    let mask = [0x11, 0x22, 0x33, 0x44];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Opens the WebSocket; `Err` with the response head when the server does not switch.
pub async fn open(web: SocketAddr) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(web).await.map_err(|e| e.to_string())?;
    let req = "GET /websockify HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n\
               Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
               Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n";
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.map_err(|e| e.to_string())?;
        head.push(b);
        if head.len() > 8192 {
            return Err("response head too long".into());
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 101") {
        Ok(s)
    } else {
        Err(head)
    }
}

/// Listens on a local port; each connection is carried over its own WebSocket to `web`. The
/// bridge task lives until the test's runtime ends.
pub async fn bridge(web: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(ws) = open(web).await {
                    carry(tcp, ws).await;
                }
            });
        }
    });
    addr
}

async fn carry(tcp: TcpStream, ws: TcpStream) {
    let (mut tr, mut tw) = tcp.into_split();
    let (mut wr, mut ww) = ws.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ww.write_all(&frame(true, 2, &buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ww.write_all(&frame(true, 8, &[])).await;
    };
    let down = async {
        loop {
            let mut h = [0u8; 2];
            if wr.read_exact(&mut h).await.is_err() {
                break;
            }
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let Ok(n) = wr.read_u16().await else { break };
                len = n.into();
            } else if len == 127 {
                let Ok(n) = wr.read_u64().await else { break };
                len = n;
            }
            if len > 64 << 20 {
                break;
            }
            let mut p = vec![0u8; len as usize];
            if wr.read_exact(&mut p).await.is_err() {
                break;
            }
            let op = h[0] & 0x0f;
            if op == 8 || (matches!(op, 0 | 2) && tw.write_all(&p).await.is_err()) {
                break;
            }
        }
        let _ = tw.shutdown().await;
    };
    // Either side ending ends the pair (a client reset closes the WebSocket at once).
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

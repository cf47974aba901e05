//! Our RFB (VNC) server. `proto` decodes client messages (no I/O); `handshake` runs versions,
//! security types and VeNCrypt; `session` is one client's message loop; `update` plans an
//! update (pure), `encoder` turns it into bytes through `encode` (ZRLE and pixel helpers),
//! `hextile`, `tight` and `pseudo`; `scroll` finds CopyRects; `clipboard` is cut text both
//! ways and `cut_text` one client's use of it; `server` accepts clients.
pub mod audio;
pub mod auth;
pub mod caps;
pub mod clipboard;
pub mod config;
pub mod cut_text;
pub mod delivery;
pub mod encode;
pub mod encoder;
pub mod extras;
pub mod frame;
pub mod h264;
pub mod handshake;
pub mod hextile;
pub mod proto;
pub mod pseudo;
pub mod scroll;
pub mod server;
pub mod session;
pub mod share;
pub mod tight;
pub mod update;

pub use config::{SharePolicy, VncConfig};
pub use handshake::ConnError;

//! Our RFB (VNC) server: `proto` decodes client messages (no I/O); `encode`, `hextile`, `tight`
//! and `pseudo` turn pixels and state into RFB bytes; `auth` holds credentials; `conn` runs one
//! client (handshake, VeNCrypt, update loop); `server` accepts them.
pub mod audio;
pub mod auth;
pub mod conn;
pub mod encode;
pub mod hextile;
pub mod keymap;
pub mod proto;
pub mod pseudo;
pub mod scroll;
pub mod server;
pub mod tight;

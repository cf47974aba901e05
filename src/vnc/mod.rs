//! Our RFB (VNC) server: `proto` decodes client messages (no I/O), `encode` turns pixels into
//! RFB encodings, `auth` holds credentials, `conn` runs one client, `server` accepts them.
pub mod auth;
pub mod conn;
pub mod encode;
pub mod keymap;
pub mod proto;
pub mod server;

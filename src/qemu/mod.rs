//! QEMU's D-Bus display (`org.qemu.Display1`): our own thin zbus bindings, the listener that
//! turns frames into the [`crate::framebuffer::Framebuffer`], and the source that attaches it.
pub mod audio;
pub mod audio_in;
pub mod clipboard;
pub mod control;
pub mod input;
pub mod listener;
pub mod listener_socket;
pub mod parked;
pub mod proxies;
pub mod shm;
pub mod source;

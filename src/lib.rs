//! vdi-sidecar: a KubeVirt hook sidecar that gives every VM a remote desktop over QEMU's D-Bus
//! display.
//!
//! Data path: `hook` (gRPC from virt-launcher → pure domain rewrite) makes QEMU join the bus that
//! `bus` runs; the display source and servers attach to that bus.

pub mod bus;
pub mod cgroup;
pub mod config;
pub mod demo;
pub mod framebuffer;
pub mod h264;
pub mod health;
pub mod hook;
pub mod metrics;
pub mod modules;
pub mod net;
pub mod pcm;
pub mod pixman;
pub mod qemu;
pub mod rdp;
pub mod serve;
pub mod session;
pub mod tls;
pub mod viewers;
pub mod vnc;
pub mod web;

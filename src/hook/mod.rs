//! The KubeVirt hook: the gRPC front end (`grpc`) over the pure domain rewrite (`domain`, `vmi`).
pub mod authority;
pub mod domain;
pub mod grpc;
pub mod proto;
pub mod vmi;

/// Hook socket file name in the hooks directory (unique across sidecars: virt-launcher
/// de-duplicates sockets by base name).
pub const SOCKET_NAME: &str = "vdi-sidecar.sock";
/// Name reported by Info (only logged by virt-launcher).
pub const HOOK_NAME: &str = "vdi-sidecar";

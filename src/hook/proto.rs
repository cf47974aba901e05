//! Generated KubeVirt hooks API and Plugin domain-hook API (see `proto/` and `build.rs`).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod info {
    tonic::include_proto!("kubevirt.hooks.info");
}
pub mod v1alpha1 {
    tonic::include_proto!("kubevirt.hooks.v1alpha1");
}
pub mod v1alpha2 {
    tonic::include_proto!("kubevirt.hooks.v1alpha2");
}
pub mod v1alpha3 {
    tonic::include_proto!("kubevirt.hooks.v1alpha3");
}
pub mod plugins_v1alpha1 {
    tonic::include_proto!("kubevirt.hooks.plugins.v1alpha1");
}

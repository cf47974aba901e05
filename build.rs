//! Generates the KubeVirt hooks and plugin gRPC code from `proto/` without a `protoc` binary (protox parses
//! the files in pure Rust).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/api_info.proto",
        "proto/api_v1alpha1.proto",
        "proto/api_v1alpha2.proto",
        "proto/api_v1alpha3.proto",
        "proto/plugins_v1alpha1.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

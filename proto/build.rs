//! Generates the Rust code of the `.proto` files with prost, using the
//! vendored `protoc` so that nothing has to be installed on the machine.
//! The metadata services (`meta.proto`) are generated only with the `grpc`
//! feature, so the guest part builds for wasm32 without tonic.

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc is available");
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        .protoc_executable(&protoc)
        .compile_protos(&["proto/guest.proto"], &["proto"])
        .expect("guest.proto compiles");
    #[cfg(feature = "grpc")]
    {
        let mut config = prost_build::Config::new();
        config.protoc_executable(&protoc);
        // Maps must encode in a fixed order: records are compared by digest.
        config.btree_map(["."]);
        tonic_prost_build::configure()
            .compile_with_config(config, &["proto/meta.proto"], &["proto"])
            .expect("meta.proto compiles");
    }
}

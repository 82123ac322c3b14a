//! Generates the Rust code of the `.proto` files with prost, using the
//! vendored `protoc` so that nothing has to be installed on the machine.
//! The metadata services (`meta.proto`) and the public API (`stoker.proto`)
//! are generated only with the `grpc` feature, so the guest part builds for
//! wasm32 without tonic.

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
        let mut config = prost_build::Config::new();
        config.protoc_executable(&protoc);
        config.btree_map(["."]);
        // The public API refers to the replicated records by their Rust
        // path, since the generated files are included side by side.
        config.extern_path(".stoker.meta.v1", "crate::meta");
        // A directory of its own: this run would otherwise rewrite the
        // metadata file generated above.
        let api_dir = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("api");
        std::fs::create_dir_all(&api_dir).expect("OUT_DIR is writable");
        tonic_prost_build::configure()
            .out_dir(&api_dir)
            .compile_with_config(config, &["proto/stoker.proto"], &["proto"])
            .expect("stoker.proto compiles");
    }
}

//! Generates the Rust code of the `.proto` files with prost, using the
//! vendored `protoc` so that nothing has to be installed on the machine.

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc is available");
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        .protoc_executable(protoc)
        .compile_protos(&["proto/guest.proto"], &["proto"])
        .expect("guest.proto compiles");
}

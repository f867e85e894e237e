//! Compiles `checkout/v1/checkout.proto` with protox (pure Rust), so no `protoc` install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "checkout/v1/checkout.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().codec_path("crate::SmallBufferCodec").compile_fds(descriptors)?;
    Ok(())
}

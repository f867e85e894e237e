//! The `checkout.v1` gRPC contract shared by the gateway (client) and checkout (server).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// `package checkout.v1` from `checkout/v1/checkout.proto`.
#[allow(missing_docs, clippy::all)]
pub mod checkout_v1 {
    tonic::include_proto!("checkout.v1");
}

pub use checkout_v1::checkout_service_client::CheckoutServiceClient;
pub use checkout_v1::checkout_service_server::{CheckoutService, CheckoutServiceServer};
pub use checkout_v1::{CheckoutRequest, CheckoutResponse, LineItem};

/// The fully-qualified gRPC service name, as grpc.health.v1 and span names spell it.
pub const CHECKOUT_SERVICE: &str = "checkout.v1.CheckoutService";

/// Initial size of a call's encode and decode buffers. tonic's default is 8 KiB per call, each
/// way: larger than glibc's per-thread cache serves (1 KiB), so every call took the allocator's
/// slow path twice on each side. An order is about a hundred bytes; a larger message grows the
/// buffer as before.
pub const CALL_BUFFER_SIZE: usize = 512;

/// tonic's default: how much a stream encodes before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// tonic-prost's codec with [`CALL_BUFFER_SIZE`] buffers (the generated client and server use
/// it; the wire format is prost's, unchanged).
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(CALL_BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(CALL_BUFFER_SIZE, YIELD_THRESHOLD))
    }
}

//! The codec of every generated `waymark.v1` service and client:
//! `tonic_prost`'s, except that a message that does not decode is
//! `INVALID_ARGUMENT` rather than `INTERNAL`.
//!
//! A request that is not a valid encoding of its message (truncated, a
//! wrong wire type, a string field that is not UTF-8) is the client's
//! mistake, and the contract says a client's mistake is never `INTERNAL`
//! (`tonic_prost::ProstCodec` follows gRPC's general advice there). On the
//! client side the same mapping applies to a response that does not
//! decode, which only a server of another API version can send.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// The codec the generated code uses (`codec_path` in `build.rs`).
#[derive(Debug, Clone)]
pub struct WaymarkCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for WaymarkCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for WaymarkCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = WaymarkDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        WaymarkDecoder {
            _pd: PhantomData,
            buffer_settings: BufferSettings::default(),
        }
    }
}

/// Decodes a `U`; a decode failure is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct WaymarkDecoder<U> {
    _pd: PhantomData<U>,
    buffer_settings: BufferSettings,
}

impl<U: Message + Default> Decoder for WaymarkDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!("the message is not a valid protobuf encoding: {e}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.buffer_settings
    }
}

// Proven end to end by `crates/waymark-cli/tests/bad_input.rs` (every
// service, raw bytes over a real connection).

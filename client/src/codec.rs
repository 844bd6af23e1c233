//! The stubs' protobuf codec: tonic-prost's, except that a message's buffer is sized once
//! from its encoded length before encoding. tonic starts each message in a small buffer
//! and prost appends to it, so a 38 MB request of float tensors grew by doubling: the
//! reallocations' copies were 23% of a tensor load's client CPU, as much as the encode
//! itself. Every call through a generated stub goes through it; `Client::classify*` and
//! the load tester's calls go through [`crate::wire`] instead, which does not copy the
//! tensors at all.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder};

/// Encodes into a buffer reserved for the whole message; decodes as tonic-prost does.
#[derive(Debug, Clone)]
pub struct PresizedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for PresizedCodec<T, U> {
    fn default() -> Self {
        PresizedCodec(PhantomData)
    }
}

impl<T, U> Codec for PresizedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = PresizedEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        PresizedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
    }
}

#[derive(Debug, Clone)]
pub struct PresizedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for PresizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

//! The gRPC codec: prost, with a small initial encode buffer.
//!
//! tonic's default keeps an 8 KiB encode buffer for the whole life of every response stream; an
//! idle subscription would hold it forever. Starting at 1 KiB (it grows as messages need) keeps
//! idle streams cheap; large messages cost nothing more.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode buffer of a call.
const ENCODE_BUFFER: usize = 1024;
/// Encoded bytes gathered before they are handed to the transport.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with a small encode buffer (see the module docs).
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
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
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}

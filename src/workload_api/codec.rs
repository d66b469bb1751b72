//! The protobuf codec of every gRPC service on the workload socket:
//! prost's, with an encoder that allocates per message instead of per call.
//!
//! tonic gives each response stream an encode buffer of
//! `BufferSettings::buffer_size` bytes (8 KiB by default) and encodes every
//! message into it. It splits each encoded message off that buffer, so the
//! one allocation lives as long as the stream does: 8 KiB for every open
//! FetchX509SVID stream, half the daemon's memory with 10,000 streams open
//! (heaptrack, BENCHMARKS.md "Memory after load"). Here the buffer starts
//! empty and each message reserves exactly its encoded length, so what a
//! stream keeps between messages is the size of its last message.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, EncodeBuf};

/// Encoded bytes gathered before tonic hands them to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 << 10;

/// Buffer settings of [`Encoder`]: an empty buffer, grown per message.
pub fn encode_settings() -> BufferSettings {
    BufferSettings::new(0, YIELD_THRESHOLD)
}

/// prost's codec with [`Encoder`]; the decoder is prost's own.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = Encoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Encoder<T> {
        Encoder { _type: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}

/// Encodes a prost message into a buffer reserved to its exact length.
#[derive(Debug, Clone)]
pub struct Encoder<T> {
    _type: PhantomData<T>,
}

impl<T: Message> tonic::codec::Encoder for Encoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        encode_settings()
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;
    use prost::Message as _;
    use tonic::codec::{Codec as _, EncodeBody};

    use super::*;

    #[tokio::test]
    async fn a_stream_of_messages_is_framed_as_grpc() {
        let messages =
            [1i64, 1 << 40, -3].map(|seconds| prost_types::Duration { seconds, nanos: 7 });
        let source = tokio_stream::iter(messages.map(Ok));
        let encoder = Codec::<prost_types::Duration, prost_types::Duration>::default().encoder();
        let mut body = std::pin::pin!(EncodeBody::new_server(
            encoder,
            source,
            None,
            Default::default(),
            None
        ));
        let mut bytes = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        let mut rest = &bytes[..];
        for msg in messages {
            let (header, tail) = rest.split_at(5);
            assert_eq!(header[0], 0, "not compressed");
            let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
            assert_eq!(prost_types::Duration::decode(&tail[..len]).unwrap(), msg);
            rest = &tail[len..];
        }
        assert!(rest.is_empty());
    }
}

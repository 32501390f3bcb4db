//! A client's mistakes are never INTERNAL: requests whose bytes are not a
//! valid encoding of their message (truncated, a wrong wire type, a string
//! field that is not UTF-8) answer INVALID_ARGUMENT on every service, and
//! the same connection keeps working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};
use waymark_proto::v1 as pb;

use common::{clients, start_dev};

/// Sends raw bytes as the request message; keeps the answer's bytes.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

async fn call(channel: &Channel, path: &'static str, body: &[u8]) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body.to_vec()),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_and_invalid_utf8_are_invalid_argument_on_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), false).await;
    let channel = Channel::from_shared(format!("http://{}", dev.info.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Field 1 is a string in each of these requests.
    let not_utf8: &[u8] = &[0x0a, 0x02, 0xff, 0xfe];
    let truncated: &[u8] = &[0x0a, 0x05, b'a'];
    let wrong_wire_type: &[u8] = &[0x0d, 0x01, 0x02, 0x03, 0x04, 0x0f];
    let paths = [
        "/waymark.v1.Query/GetPerson",
        "/waymark.v1.Query/ListInteractions",
        "/waymark.v1.Query/ResolveIdentity",
        "/waymark.v1.Admin/StartRebuild",
    ];
    for path in paths {
        for body in [not_utf8, truncated, wrong_wire_type] {
            let status = call(&channel, path, body).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{path} {body:?}: {status:?}"
            );
        }
    }
    // An event (PublishRequest.events, repeated string) that is not UTF-8.
    let event = [0x0a, 0x03, 0x0a, 0x01, 0xff];
    let status = call(&channel, "/waymark.v1.Ingest/Publish", &event)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The connection and the service are fine afterwards.
    let mut query = clients(&dev.info.grpc_addr).await.query;
    let status = query
        .get_person(pb::GetPersonRequest {
            person_id: "00000000-0000-0000-0000-000000000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    dev.stop().await.unwrap();
}

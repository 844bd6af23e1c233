//! A call's body read into messages: the one message of a unary call
//! ([`read_message`]) or each message of a stream as it completes ([`messages`]), framed
//! by gRPC's 5-byte prefix and refused with tonic's own statuses for the same faults.

use std::sync::Arc;

use bytes::Buf;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::Status;

use super::{Frames, FromFrames, Limits, PREFIX_LEN};
use crate::api::admission::{Bounded, ByteBudget, Held, Reservation};

/// A streaming call's messages, decoded from its frames as each is complete, each with
/// the share of the server's budget it holds until answered.
pub type Messages<M> = tokio_stream::wrappers::ReceiverStream<Result<Held<M>, Status>>;

/// Reads a streaming call's body in a task of its own and hands on each message as its
/// last byte arrives. Ends at the end of the body; a fault ends it after one error
/// (tonic's status for the same fault; RESOURCE_EXHAUSTED when the server's budget is
/// spent, INVALID_ARGUMENT past a count), and a call the client cancelled just ends. One
/// message waits at most, so a slow handler slows the reads, and HTTP/2 flow control
/// the client.
pub fn messages<M: FromFrames + Bounded + Send + 'static>(
    mut body: Body,
    limits: Limits,
) -> Messages<M> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut received = Frames::default();
        let mut message: Option<(usize, Reservation)> = None;
        loop {
            // Every message complete so far.
            loop {
                let len = match &message {
                    Some((len, _)) => *len,
                    None => match received.prefix() {
                        None => break,
                        Some(prefix) => match message_len_of(prefix, limits.max_decoding)
                            .and_then(|len| Ok((len, limits.budget.reserve(len)?)))
                        {
                            Ok((len, reservation)) => {
                                received.advance(PREFIX_LEN);
                                message = Some((len, reservation));
                                len
                            }
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        },
                    },
                };
                if received.remaining() < len {
                    break;
                }
                let Some((_, reservation)) = message.take() else {
                    break;
                };
                let frames = received.split_to(len);
                let message = M::check_counts(&frames, &limits.counts)
                    .and_then(|()| M::decode_frames(frames))
                    .map(|message| Held {
                        message,
                        reservation: Some(reservation),
                    });
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    return;
                }
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    // Trailers of a request stream carry nothing a handler reads.
                    if let Ok(data) = frame.into_data() {
                        received.push(data);
                    }
                }
                Some(Err(status)) => {
                    if status.code() != tonic::Code::Cancelled {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
                None => {
                    if received.remaining() > 0 || message.is_some() {
                        let _ = tx
                            .send(Err(Status::internal("Unexpected EOF decoding stream.")))
                            .await;
                    }
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Reads a unary call's one message (the frames after its prefix) and the request's
/// trailers, if it sent any, with the message's reservation of `budget`, made as soon as
/// its prefix announces its length (a call past the budget is refused before its body is
/// read). The statuses are tonic's for the same faults.
pub async fn read_message(
    mut body: Body,
    max_decoding: usize,
    budget: &Arc<ByteBudget>,
) -> Result<(Frames, Option<http::HeaderMap>, Reservation), Status> {
    let mut received = Frames::default();
    let mut trailers: Option<http::HeaderMap> = None;
    let mut message_len = None;
    let mut reservation = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                received.push(data);
                if message_len.is_none() {
                    if let Some(prefix) = received.prefix() {
                        let len = message_len_of(prefix, max_decoding)?;
                        reservation = Some(budget.reserve(len)?);
                        message_len = Some(len);
                    }
                }
                // Refused as soon as it shows, so what a call holds stays within the limit.
                if message_len.is_some_and(|n| received.remaining() > PREFIX_LEN + n) {
                    return Err(Status::internal(
                        "protocol error: a unary call carries one message; this request had more",
                    ));
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(Default::default).extend(more);
                }
            }
        }
    }
    if received.remaining() == 0 {
        return Err(Status::internal("Missing request message."));
    }
    // Never more (refused above): fewer is a body that ended inside its message.
    let (Some(reservation), true) = (
        reservation,
        message_len == Some(received.remaining().saturating_sub(PREFIX_LEN)),
    ) else {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    };
    received.advance(PREFIX_LEN);
    Ok((received, trailers, reservation))
}

/// The message length a prefix announces, checked against the limit.
fn message_len_of(prefix: [u8; PREFIX_LEN], limit: usize) -> Result<usize, Status> {
    match prefix[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        flag => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1) while receiving request"
            )))
        }
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > limit {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {limit} bytes"
        )));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use bytes::Bytes;
    use prost::Message;

    use super::*;
    use crate::api::admission::Counts;
    use crate::api::unary::test_requests::{tensor_data, tensor_request};
    use crate::proto;

    fn body_of(chunks: Vec<Bytes>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(http_body::Frame::data(c)));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[tokio::test]
    async fn a_message_is_read_from_many_frames_up_to_its_announced_length() {
        let message = tensor_request(2, 300).encode_to_vec();
        let wire = Bytes::from(framed(0, &message));
        let chunks = (0..wire.len())
            .step_by(97)
            .map(|s| wire.slice(s..(s + 97).min(wire.len())))
            .collect();
        let (frames, trailers, _) =
            read_message(body_of(chunks), 1 << 20, &ByteBudget::unlimited())
                .await
                .expect("read");
        assert!(trailers.is_none());
        assert_eq!(frames.remaining(), message.len());
        let decoded = proto::ClassifyRequest::decode(frames).expect("decodes");
        assert_eq!(decoded, tensor_request(2, 300));
    }

    #[tokio::test]
    async fn framing_faults_get_tonics_statuses() {
        let cases: Vec<(Vec<u8>, tonic::Code, &str)> = vec![
            (vec![], tonic::Code::Internal, "Missing request message"),
            (vec![0, 0, 0], tonic::Code::Internal, "Unexpected EOF"),
            (
                framed(0, &[1, 2, 3])[..6].to_vec(),
                tonic::Code::Internal,
                "Unexpected EOF",
            ),
            (
                framed(1, &[1, 2, 3]),
                tonic::Code::Internal,
                "compressed-flag",
            ),
            (
                framed(7, &[1, 2, 3]),
                tonic::Code::Internal,
                "invalid compression flag: 7",
            ),
            (
                [framed(0, &[1]), framed(0, &[2])].concat(),
                tonic::Code::Internal,
                "one message",
            ),
            (
                framed(0, &[0; 2000]),
                tonic::Code::OutOfRange,
                "found 2000 bytes, the limit is: 1024 bytes",
            ),
        ];
        for (wire, code, text) in cases {
            let err = read_message(
                body_of(vec![Bytes::from(wire.clone())]),
                1024,
                &ByteBudget::unlimited(),
            )
            .await
            .expect_err("refused");
            assert_eq!(err.code(), code, "{wire:?}: {err}");
            assert!(err.message().contains(text), "{wire:?}: {}", err.message());
        }
    }

    #[tokio::test]
    async fn bytes_past_the_message_are_refused_without_waiting_for_the_body_to_end() {
        let wire = Bytes::from([framed(0, &[1, 2, 3]), framed(0, &[4])].concat());
        let err = within_a_second(read_message(
            unending_body(wire),
            1 << 20,
            &ByteBudget::unlimited(),
        ))
        .await
        .expect_err("refused");
        assert!(err.message().contains("one message"), "{err}");
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_from_its_prefix_before_its_body_arrives() {
        let mut announced = vec![0u8];
        announced.extend_from_slice(&(64u32 << 20).to_be_bytes());
        let err = within_a_second(read_message(
            unending_body(announced.into()),
            1 << 20,
            &ByteBudget::unlimited(),
        ))
        .await
        .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::OutOfRange);
    }

    #[tokio::test]
    async fn a_message_past_the_servers_budget_is_refused_from_its_prefix() {
        let budget = ByteBudget::new(1 << 20, None);
        let held = budget.reserve(600 << 10).expect("fits");
        let mut announced = vec![0u8];
        announced.extend_from_slice(&(500u32 << 10).to_be_bytes());
        let err = within_a_second(read_message(
            unending_body(announced.into()),
            1 << 30,
            &budget,
        ))
        .await
        .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        drop(held);
        // Freed: the same message fits, and holds its bytes until dropped.
        let wire = Bytes::from(framed(0, &[7; 1000]));
        let (_, _, reservation) = read_message(body_of(vec![wire]), 1 << 30, &budget)
            .await
            .expect("read");
        assert_eq!(budget.used(), 1000);
        drop(reservation);
        assert_eq!(budget.used(), 0);
    }

    /// Fails the test instead of hanging it when `f` waits for more of the body.
    async fn within_a_second<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(1), f)
            .await
            .expect("answered without waiting for the body to end")
    }

    /// A body whose first frame is `first` and which then never ends.
    fn unending_body(first: Bytes) -> Body {
        let first = tokio_stream::iter([Ok::<_, Status>(http_body::Frame::data(first))]);
        Body::new(http_body_util::StreamBody::new(
            tokio_stream::StreamExt::chain(first, tokio_stream::pending()),
        ))
    }

    /// Everything a stream decoder yields for `chunks`.
    async fn stream_of(
        chunks: Vec<Bytes>,
        limit: usize,
    ) -> Vec<Result<proto::ClassifyRequest, Status>> {
        use tokio_stream::StreamExt;
        let limits = Limits {
            max_decoding: limit,
            max_encoding: limit,
            counts: Counts::new(256, limit),
            budget: ByteBudget::unlimited(),
        };
        let held: Vec<_> =
            within_a_second(messages::<proto::ClassifyRequest>(body_of(chunks), limits).collect())
                .await;
        held.into_iter().map(|r| r.map(|h| h.message)).collect()
    }

    #[tokio::test]
    async fn stream_messages_come_out_whole_however_the_frames_cut_them() {
        let requests: Vec<_> = (1..=3).map(|n| tensor_request(n, 200)).collect();
        let wire: Vec<u8> = requests
            .iter()
            .flat_map(|r| framed(0, &r.encode_to_vec()))
            .collect();
        let wire = Bytes::from(wire);
        for step in [1, 5, 7, 97, 1000, wire.len()] {
            let chunks = (0..wire.len())
                .step_by(step)
                .map(|s| wire.slice(s..(s + step).min(wire.len())))
                .collect();
            let got: Vec<_> = stream_of(chunks, 1 << 20)
                .await
                .into_iter()
                .map(|r| r.expect("decodes"))
                .collect();
            assert_eq!(got, requests, "frames of {step} bytes");
        }
        // A tensor inside one frame is a slice of that frame.
        let one = Bytes::from(framed(0, &tensor_request(1, 5000).encode_to_vec()));
        let got = stream_of(vec![one.clone()], 1 << 20).await;
        let decoded = got[0].as_ref().expect("decodes");
        let tensor = tensor_data(decoded)[0];
        assert!(one.as_ptr_range().contains(&tensor.as_ptr()));
        // An empty message is a default one; an empty body, no message.
        let empty = stream_of(vec![Bytes::from(framed(0, &[]))], 1 << 20).await;
        assert_eq!(empty.len(), 1);
        assert_eq!(
            empty[0].as_ref().expect("decodes"),
            &proto::ClassifyRequest::default()
        );
        assert!(stream_of(vec![], 1 << 20).await.is_empty());
    }

    #[tokio::test]
    async fn a_stream_fault_ends_it_after_the_good_messages_with_tonics_status() {
        let good = framed(0, &tensor_request(1, 50).encode_to_vec());
        let with = |tail: Vec<u8>| {
            let mut wire = good.clone();
            wire.extend(tail);
            vec![Bytes::from(wire)]
        };
        let mut big = vec![0u8];
        big.extend_from_slice(&(2u32 << 20).to_be_bytes());
        let cases: Vec<(Vec<u8>, tonic::Code, &str)> = vec![
            (vec![0, 0], tonic::Code::Internal, "Unexpected EOF"),
            (
                framed(0, &[1, 2, 3])[..7].to_vec(),
                tonic::Code::Internal,
                "Unexpected EOF",
            ),
            (framed(1, &[]), tonic::Code::Internal, "compressed-flag"),
            (big, tonic::Code::OutOfRange, "the limit is: 1048576 bytes"),
            (
                framed(0, &[0xff, 0xff]),
                tonic::Code::Internal,
                "failed to decode",
            ),
        ];
        for (tail, code, text) in cases {
            let got = stream_of(with(tail.clone()), 1 << 20).await;
            assert_eq!(got.len(), 2, "{tail:?}");
            assert!(got[0].is_ok());
            let err = got[1].as_ref().expect_err("fault");
            assert_eq!(err.code(), code, "{tail:?}: {err}");
            assert!(err.message().contains(text), "{tail:?}: {err}");
        }
    }
}

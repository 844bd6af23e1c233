//! The plumbing of a bidirectional stream, shared by `ClassifyStream` and KServe's
//! `ModelStreamInfer`.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::api::state::InFlightGuard;

/// A bidirectional stream's plumbing, shared by `ClassifyStream` and KServe's
/// `ModelStreamInfer`: each message is handled in its own task, at most `window` at once
/// (past that the reader stops reading and HTTP/2 flow control slows the producer), and
/// the answers go out in arrival order. `failed` answers for a task that died. The
/// in-flight `guard` is held until the last answer is sent.
pub(crate) fn ordered_stream<In, Out, F, Fut>(
    mut inbound: impl tokio_stream::Stream<Item = Result<In, Status>> + Send + Unpin + 'static,
    window: usize,
    guard: InFlightGuard,
    mut handle: F,
    failed: fn(tokio::task::JoinError) -> Result<Out, Status>,
) -> ReceiverStream<Result<Out, Status>>
where
    In: Send + 'static,
    Out: Send + 'static,
    F: FnMut(In) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Out, Status>> + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(16);
    let (pending_tx, mut pending_rx) =
        mpsc::channel::<tokio::task::JoinHandle<Result<Out, Status>>>(window.max(1));
    tokio::spawn(async move {
        use tokio_stream::StreamExt;
        loop {
            match inbound.next().await.transpose() {
                Ok(Some(message)) => {
                    if pending_tx
                        .send(tokio::spawn(handle(message)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    // A malformed, oversize or refused message ends the stream with its
                    // status once the messages before it are answered (never OK, and
                    // never a silent end that leaves the client waiting).
                    tracing::debug!("stream ended: {status}");
                    let _ = pending_tx
                        .send(tokio::spawn(async move { Err(status) }))
                        .await;
                    break;
                }
            }
        }
    });
    tokio::spawn(async move {
        let _guard = guard;
        while let Some(task) = pending_rx.recv().await {
            let answer = task.await.unwrap_or_else(failed);
            if out_tx.send(answer).await.is_err() {
                break; // the client went away
            }
        }
    });
    ReceiverStream::new(out_rx)
}

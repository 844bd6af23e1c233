//! Closing a connection without losing the requests a client sent just before it.
//!
//! The server ends an HTTP/2 connection (drain, connection age) with GOAWAY, finishes
//! the calls it took and drops the socket. A client may have sent another request in
//! the meantime, not having read the GOAWAY yet. If those bytes are still unread when
//! the socket closes, the kernel answers with RST instead of FIN: the client's next
//! write fails with EPIPE before it reads the GOAWAY that says the request was never
//! taken, and the call ends as "broken pipe", a request lost (tests/soak.rs, plaintext,
//! about one run in six).
//!
//! [`Lingering`] closes as HTTP/1 servers long have (Apache's lingering close, Go's
//! `closeWriteAndWait`): once dropped, it shuts its sending side (a FIN after all it
//! sent) and reads and discards what the client still sends until the client closes
//! too, for [`LINGER`] at most. [`Closes`] keeps count, so that a draining server waits
//! for them before the process exits, as exiting would reset them all the same.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

/// The longest a closed connection is read from for the client's sake. A client that
/// reads the GOAWAY and the FIN closes at once; this bounds one that does not.
pub const LINGER: Duration = Duration::from_secs(2);

/// The most closes under way at once; past it a connection closes at once. Clients
/// that open and drop connections (failed TLS handshakes among them) faster than they
/// close their side would otherwise hold descriptors for [`LINGER`] each.
pub const MAX_LINGERING: usize = 1024;

/// The lingering closes of one listener.
#[derive(Clone, Debug)]
pub struct Closes {
    tasks: TaskTracker,
    limit: usize,
}

impl Default for Closes {
    fn default() -> Self {
        Closes::with_limit(MAX_LINGERING)
    }
}

impl Closes {
    /// At most `limit` closes under way at once.
    pub fn with_limit(limit: usize) -> Closes {
        Closes {
            tasks: TaskTracker::new(),
            limit,
        }
    }

    /// `stream`, to close lingering when dropped.
    pub fn wrap(&self, stream: TcpStream) -> Lingering {
        Lingering {
            stream: Some(stream),
            closes: self.clone(),
        }
    }

    /// Resolves once every close under way has ended. Each ends within [`LINGER`];
    /// the bound here is for closes that start while it waits.
    pub async fn finished(&self) {
        self.tasks.close();
        let _ = tokio::time::timeout(2 * LINGER, self.tasks.wait()).await;
    }

    /// How many closes are under way.
    pub fn under_way(&self) -> usize {
        self.tasks.len()
    }
}

/// A TCP connection that closes lingering (see the module doc) when dropped.
#[derive(Debug)]
pub struct Lingering {
    /// `None` only once dropped.
    stream: Option<TcpStream>,
    closes: Closes,
}

impl Lingering {
    /// The connection, for its socket options.
    pub fn tcp(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }

    fn io(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.closes.under_way() >= self.closes.limit {
            return;
        }
        // Without a runtime (the process is ending) it closes as any socket does.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.closes.tasks.spawn_on(linger(stream), &runtime);
        }
    }
}

/// Sends FIN after everything written, then reads until the client closes.
async fn linger(mut stream: TcpStream) {
    let _ = tokio::time::timeout(LINGER, async {
        // Already shut when h2 closed the connection itself: that error changes nothing.
        let _ = stream.shutdown().await;
        let mut discarded = [0u8; 8192];
        while let Ok(n) = stream.read(&mut discarded).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl tonic::transport::server::Connected for Lingering {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match &self.stream {
            Some(s) => s.connect_info(),
            None => tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers "bye" and closes while a request the client sent lies
    /// unread: what the client then reads.
    async fn close_with_unread_request(lingering: bool) -> (io::Result<Vec<u8>>, Closes) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let closes = Closes::default();
        client.write_all(b"request").await.expect("sent");
        // The request reaches the server's receive queue before it closes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if lingering {
            let mut server = closes.wrap(server);
            server.write_all(b"bye").await.expect("written");
            drop(server);
        } else {
            let mut server = server;
            server.write_all(b"bye").await.expect("written");
            drop(server);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The client sends again before it reads, as an h2 client with a request under
        // way does.
        let sent = client.write_all(b"another").await;
        let mut read = Vec::new();
        let read = match sent {
            Ok(()) => client.read_to_end(&mut read).await.map(|_| read),
            Err(e) => Err(e),
        };
        (read, closes)
    }

    #[tokio::test]
    async fn the_client_reads_all_sent_then_the_end_instead_of_a_reset() {
        let (read, closes) = close_with_unread_request(true).await;
        assert_eq!(read.expect("no reset"), b"bye");
        tokio::time::timeout(Duration::from_secs(1), closes.finished())
            .await
            .expect("the close ends once the client's side is read to its end");
        assert_eq!(closes.under_way(), 0);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_plain_close_with_a_request_unread_resets_the_connection() {
        // What the wrapper is for: Linux sends RST, and the client never reads "bye".
        let (read, _) = close_with_unread_request(false).await;
        let e = read.expect_err("reset");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_closes_is_let_go_after_the_linger() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let closes = Closes::default();
        drop(closes.wrap(server));
        assert_eq!(closes.under_way(), 1);
        let started = tokio::time::Instant::now();
        closes.finished().await;
        assert_eq!(closes.under_way(), 0);
        assert!(started.elapsed() >= LINGER, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn past_the_limit_a_connection_closes_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let closes = Closes::with_limit(1);
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            let (server, _) = listener.accept().await.expect("accept");
            drop(closes.wrap(server));
        }
        // The clients never close their side: without the limit all three would linger.
        assert_eq!(closes.under_way(), 1);
        drop(clients);
    }
}

//! What the server does to the connections it accepts: Nagle's algorithm off on each,
//! each closed lingering, the plaintext listener polled by tonic itself, and the
//! connection age jittered per server.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::process::linger::{Closes, Lingering};

/// The accepted connections, with Nagle's algorithm off (see [`nodelay`]), each closing
/// lingering (crate::process::linger).
pub(super) fn accepted(
    listener: TcpListener,
    closes: Closes,
) -> impl tokio_stream::Stream<Item = std::io::Result<Lingering>> {
    // Polled by tonic itself, not fed from a task of its own: once tonic stops taking
    // connections the listener is gone with this stream, so a client finds the port
    // closed (never sent) instead of a connection accepted and then dropped under its
    // call (a lost request at shutdown; tests/soak.rs caught one).
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener)
        .map(move |result| result.inspect(nodelay).map(|s| closes.wrap(s)))
}

/// Turns Nagle's algorithm off on an accepted connection. A reply goes out as several
/// small writes (headers, message, trailers); with Nagle on, the later ones wait for the
/// client to acknowledge the first, and the client delays that acknowledgement by up to
/// 40 ms. That was ~36 ms of every 64-tensor request's 73 ms at concurrency 1.
pub(crate) fn nodelay(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY: {e}");
    }
}

/// `age` moved by up to 10% either way, so that replicas started together do not close
/// their connections all at once. tonic applies one age to every connection of a server,
/// so the draw is made once per server.
pub(super) fn jittered(age: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A random u64 without a dependency for it: std seeds each RandomState at random.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // In [0.9, 1.1].
    let factor = 0.9 + 0.2 * (random >> 11) as f64 / (1u64 << 53) as f64;
    // `mul_f64` panics past `Duration::MAX`; config caps the age, this never panics.
    Duration::try_from_secs_f64(age.as_secs_f64() * factor).unwrap_or(age)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = Box::pin(accepted(listener, Closes::default()));
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming.next().await.expect("one").expect("accepted");
        let tcp = accepted.tcp().expect("open");
        assert!(tcp.nodelay().expect("option"));
    }

    #[test]
    fn connection_ages_are_jittered_by_ten_percent_at_most() {
        let age = Duration::from_secs(100);
        let draws: Vec<Duration> = (0..200).map(|_| jittered(age)).collect();
        for d in &draws {
            assert!(
                *d >= Duration::from_secs(90) && *d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        // Near `Duration::MAX` every draw above ~1.0 overflows (`mul_f64` panicked on
        // about half of them): such an age is kept as it is.
        for _ in 0..64 {
            assert!(jittered(Duration::MAX) >= Duration::MAX.mul_f64(0.85));
        }
        let (min, max) = (draws.iter().min(), draws.iter().max());
        assert!(
            max.zip(min)
                .is_some_and(|(a, b)| *a - *b > Duration::from_secs(5)),
            "spread: {min:?}..{max:?}"
        );
    }
}

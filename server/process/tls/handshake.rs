//! Accepting connections on the TLS port: each handshake a task of its own within the
//! deadline, at most so many under way at once and per IP address, and the stream of
//! handshaken connections that ends only once every one accepted before the stop has
//! been handed over.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use super::Tls;
use crate::process::linger::{Closes, Lingering};

/// Finished handshakes waiting for the server to take them; past it, handshakes wait.
const READY_CONNECTIONS: usize = 64;

/// Handshakes under way per source IP address; an address leaves the map when its
/// last handshake ends, so it holds only addresses with one under way.
#[derive(Debug)]
struct PerIp {
    limit: u32,
    under_way: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
}

/// One handshake's place in [`PerIp`], given back when dropped.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn try_take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        let mut map = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.get(&ip).copied().unwrap_or(0);
        if n >= self.limit {
            return None;
        }
        map.insert(ip, n.saturating_add(1));
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self
            .per_ip
            .under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Tls {
    /// Accepts connections on `listener` and yields them once their handshake is done.
    /// Each handshake is a task of its own with a deadline, so none waits for another.
    ///
    /// When `stop` resolves, the listener closes at once (a client then finds the port
    /// closed: its request was never sent), the handshakes under way finish or time out,
    /// and the stream ends once every connection they made has been yielded. The server
    /// must stop on the stream's end, not on a signal of its own: a connection accepted
    /// and handshaken but not yet taken from the stream would be dropped with a request
    /// the client sent on it (tests/soak.rs, over TLS). Dropping the stream also closes
    /// the listener.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
        closes: Closes,
    ) -> ReceiverStream<std::io::Result<TlsStream<Lingering>>> {
        let (tx, rx) = mpsc::channel(READY_CONNECTIONS);
        let tls = self.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(self.options.max_handshakes));
        let per_ip = Arc::new(PerIp {
            limit: self.options.max_handshakes_per_ip,
            under_way: Default::default(),
        });
        tokio::spawn(async move {
            let mut errors = crate::process::accept::AcceptErrors::default();
            let mut stop = std::pin::pin!(stop);
            loop {
                // Out of descriptors, it waits rather than spins (crate::process::accept).
                // Biased: once `stop` has resolved, no connection is accepted after it.
                let (stream, peer) = tokio::select! {
                    biased;
                    () = &mut stop => break,
                    () = tx.closed() => break,
                    accepted = crate::process::accept::accept(&listener, &mut errors) => accepted,
                };
                let Some(ip_slot) = per_ip.try_take(peer.ip()) else {
                    tls.handshake_failures.with_label_values(&["busy"]).inc();
                    drop(stream);
                    continue;
                };
                let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                    tls.handshake_failures.with_label_values(&["busy"]).inc();
                    drop(stream);
                    continue;
                };
                crate::process::server::nodelay(&stream);
                // Closed lingering, failed handshakes too (their last alert gets there),
                // as many at once as `linger::MAX_LINGERING`.
                let stream = closes.wrap(stream);
                let acceptor = TlsAcceptor::from(tls.config());
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _slots = (slot, ip_slot);
                    match tokio::time::timeout(
                        tls.options.handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(connection)) => {
                            let _ = tx.send(Ok(connection)).await;
                        }
                        // Debug only: anyone who can reach the port can make these.
                        Ok(Err(e)) => {
                            tls.handshake_failures.with_label_values(&["error"]).inc();
                            tracing::debug!(?peer, "TLS handshake failed: {e}");
                        }
                        Err(_) => {
                            tls.handshake_failures.with_label_values(&["timeout"]).inc();
                            tracing::debug!(?peer, "TLS handshake timed out");
                        }
                    }
                });
            }
            // The port closes now; the stream ends when the last handshake's task, which
            // holds a sender, has handed its connection over or given up.
            drop(listener);
        });
        ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{client, Ca, Setup};
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_stream::StreamExt;

    type Incoming = ReceiverStream<std::io::Result<TlsStream<Lingering>>>;

    /// `setup`'s TLS accepting on a loopback port until `stop`: the TLS (for its
    /// metrics), the port's address and the handshaken connections.
    async fn accepting(
        setup: &Setup,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (Arc<Tls>, std::net::SocketAddr, Incoming) {
        let metrics = crate::process::metrics::Metrics::new();
        let tls = Tls::load(setup.options.clone(), &metrics).expect("loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tls.incoming(listener, stop, Closes::default());
        (tls, addr, incoming)
    }

    #[tokio::test]
    async fn connections_past_the_handshakes_under_way_are_closed() {
        let ca = Ca::new("test CA");
        let mut setup = Setup::new(&ca.leaf("server"), None);
        setup.options.max_handshakes = 1;
        let (tls, addr, mut incoming) = accepting(&setup, std::future::pending()).await;
        let name = || ServerName::try_from("localhost").expect("name");

        // The one slot, held by a client that says nothing.
        let silent = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let refused = client(&ca, None).connect(name(), tcp).await;
        assert!(refused.is_err(), "a handshake past the limit went through");
        assert_eq!(tls.handshake_failures.with_label_values(&["busy"]).get(), 1);

        // The slot is free again once the silent client leaves.
        drop(silent);
        let mut served = false;
        for _ in 0..100 {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            if client(&ca, None).connect(name(), tcp).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "the slot was never given back");
        let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(accepted, Ok(Some(Ok(_)))));
    }

    #[test]
    fn handshakes_per_ip_are_counted_and_forgotten_at_zero() {
        let per_ip = Arc::new(PerIp {
            limit: 2,
            under_way: Default::default(),
        });
        let a: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: std::net::IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let b: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
        let first = per_ip.try_take(a).expect("one");
        let second = per_ip.try_take(mapped).expect("two, the same address");
        assert!(per_ip.try_take(a).is_none(), "a third from one address");
        let other = per_ip.try_take(b).expect("another address");
        drop(first);
        let third = per_ip.try_take(a).expect("a place was given back");
        drop((second, third, other));
        assert_eq!(
            per_ip.len(),
            0,
            "addresses with nothing under way are forgotten"
        );
    }

    #[tokio::test]
    async fn handshakes_past_the_limit_of_one_address_are_closed() {
        let ca = Ca::new("test CA");
        let mut setup = Setup::new(&ca.leaf("server"), None);
        setup.options.max_handshakes_per_ip = 1;
        let (tls, addr, mut incoming) = accepting(&setup, std::future::pending()).await;
        let port = addr.port();
        let name = || ServerName::try_from("localhost").expect("name");
        let from = |ip: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(std::net::SocketAddr::from((ip, 0)))
                .expect("bind");
            socket
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
                .expect("connect")
        };

        // 127.0.0.1's one handshake, held by a client that says nothing.
        let silent = from([127, 0, 0, 1]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = client(&ca, None)
            .connect(name(), from([127, 0, 0, 1]).await)
            .await;
        assert!(refused.is_err(), "a second handshake from one address");
        assert_eq!(tls.handshake_failures.with_label_values(&["busy"]).get(), 1);
        // Another address (all of 127/8 is loopback on Linux) is served meanwhile.
        let other = client(&ca, None)
            .connect(name(), from([127, 0, 0, 2]).await)
            .await;
        assert!(other.is_ok(), "{other:?}");
        let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(accepted, Ok(Some(Ok(_)))));

        // Once the silent client leaves, its address may handshake again.
        drop(silent);
        let mut served = false;
        for _ in 0..100 {
            let tcp = from([127, 0, 0, 1]).await;
            if client(&ca, None).connect(name(), tcp).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "the address's place was never given back");
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_others_and_times_out() {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("server");
        let mut setup = Setup::new(&leaf, None);
        setup.options.handshake_timeout = Duration::from_millis(1500);
        let (tls, addr, mut incoming) = accepting(&setup, std::future::pending()).await;

        // Connects and says nothing.
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let connector = client(&ca, None);
        let client_side = tokio::spawn(async move { connector.connect(name, tcp).await });
        let accepted = tokio::time::timeout(Duration::from_millis(1200), incoming.next())
            .await
            .expect("the second client's handshake finishes before the first times out")
            .expect("a connection")
            .expect("accepted");
        let tcp = accepted.get_ref().0.tcp().expect("open");
        assert!(tcp.nodelay().expect("option"), "Nagle off");
        let _client = client_side.await.expect("task").expect("client handshake");

        tokio::time::sleep(Duration::from_millis(1600)).await;
        let timeouts = tls.handshake_failures.with_label_values(&["timeout"]).get();
        assert_eq!(timeouts, 1);

        // Plaintext HTTP/2 to the TLS port: a handshake error.
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        plain
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        let _ = plain.read_to_end(&mut rest).await;
        // Counted by the handshake's task once it has let go of the connection.
        let errors = || tls.handshake_failures.with_label_values(&["error"]).get();
        for _ in 0..200 {
            if errors() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(errors(), 1);
    }

    #[tokio::test]
    async fn at_stop_the_port_closes_and_every_handshaken_connection_is_yielded() {
        let ca = Ca::new("test CA");
        let setup = Setup::new(&ca.leaf("server"), None);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (_tls, addr, mut incoming) = accepting(&setup, async {
            let _ = stop_rx.await;
        })
        .await;
        let name = || ServerName::try_from("localhost").expect("name");

        // Handshaken before the stop and not yet taken from the stream: a client that
        // has sent its request on it.
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut waiting = client(&ca, None)
            .connect(name(), tcp)
            .await
            .expect("handshake");
        waiting.write_all(b"first").await.expect("write");
        waiting.flush().await.expect("flush");
        // Accepted before the stop, its handshake after it.
        let late = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(200)).await;

        stop_tx.send(()).expect("stop");
        let mut closed = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the port still takes connections after the stop");
        let mut late = client(&ca, None)
            .connect(name(), late)
            .await
            .expect("a handshake under way at the stop finishes");
        late.write_all(b"second").await.expect("write");
        late.flush().await.expect("flush");

        let mut got = Vec::new();
        while let Some(connection) = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("the stream ends once both are yielded")
        {
            let mut connection = connection.expect("accepted");
            let mut buf = [0u8; 6];
            let n = connection.read(&mut buf).await.expect("read");
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got.sort();
        assert_eq!(got, ["first", "second"]);
    }
}

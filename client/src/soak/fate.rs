//! How one request of the soak ended — answered by the server, not taken (safe to
//! retry), or lost — told from the errors under the call's status (see the definitions
//! in [`super`]'s module doc).

use std::error::Error as _;

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Fate {
    Answered(tonic::Code),
    NotTaken(&'static str),
    Lost(String),
}

/// Sorts a call's result by the module doc's definitions.
pub(super) fn fate(result: &Result<(), tonic::Status>) -> Fate {
    let status = match result {
        Ok(()) => return Fate::Answered(tonic::Code::Ok),
        Err(s) => s,
    };
    let Some(source) = status.source() else {
        return Fate::Answered(status.code());
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Fate::NotTaken("refused_stream");
            }
            // A GOAWAY received fails the streams above its last stream id with this
            // error; a stream the server took and then dropped fails with a broken pipe.
            if h2.is_go_away() && h2.is_remote() {
                return Fate::NotTaken("goaway");
            }
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return Fate::NotTaken("canceled_unsent");
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Fate::NotTaken("connection_refused");
            }
        }
        next = e.source();
    }
    let mut message = format!("{:?}: {}", status.code(), status.message());
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = next {
        message.push_str(&format!(": {e}"));
        next = e.source();
    }
    Fate::Lost(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_servers_statuses_are_answers() {
        assert_eq!(fate(&Ok(())), Fate::Answered(tonic::Code::Ok));
        let refused = tonic::Status::resource_exhausted("queue full");
        assert_eq!(
            fate(&Err(refused)),
            Fate::Answered(tonic::Code::ResourceExhausted)
        );
    }

    #[test]
    fn transport_failures_are_not_taken_or_lost() {
        let with = |source: Box<dyn std::error::Error + Send + Sync>| {
            let mut s = tonic::Status::unavailable("transport");
            s.set_source(Arc::from(source));
            fate(&Err(s))
        };
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            with(Box::new(refused)),
            Fate::NotTaken("connection_refused")
        );
        assert_eq!(
            with(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM))),
            Fate::NotTaken("refused_stream")
        );
        let reset = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed");
        assert!(matches!(with(Box::new(reset)), Fate::Lost(m) if m.contains("stream closed")));
        // A stream reset with no status is lost too.
        assert!(matches!(
            with(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR))),
            Fate::Lost(_)
        ));
    }
}

//! Every error a request can meet, and the one place they become gRPC statuses.

use tonic::{Code, Status};

use crate::api::shm::ShmError;
use crate::preprocess::PreprocessError;
use crate::scheduler::ScheduleError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("unknown model '{}'; this server serves: {}", excerpt(.name, NAME_CHARS), excerpt(.available, LIST_CHARS))]
    UnknownModel { name: String, available: String },
    /// A configured model whose load has not finished (or, before any is loaded, a
    /// request that names none).
    #[error("model {} is loading; retry shortly", excerpt(.0, NAME_CHARS))]
    Loading(String),
    #[error("image {index}: {source}")]
    Image {
        index: usize,
        #[source]
        source: PreprocessError,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("server is shutting down; retry on another replica")]
    Draining,
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    SharedMemory(#[from] ShmError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            ServeError::UnknownModel { .. } => Code::NotFound,
            ServeError::Image { .. }
            | ServeError::InvalidArgument(_)
            | ServeError::Schedule(ScheduleError::NonFinite { .. })
            | ServeError::Schedule(ScheduleError::LargerThanQueue { .. }) => Code::InvalidArgument,
            ServeError::Schedule(ScheduleError::QueueFull { .. }) => Code::ResourceExhausted,
            ServeError::Schedule(ScheduleError::DeadlineExceeded(_)) => Code::DeadlineExceeded,
            ServeError::Schedule(ScheduleError::Stopped(_))
            | ServeError::Draining
            | ServeError::Loading(_) => Code::Unavailable,
            ServeError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServeError::Schedule(ScheduleError::Compute { .. }) | ServeError::Internal(_) => {
                Code::Internal
            }
            ServeError::SharedMemory(e) => match e {
                ShmError::Disabled => Code::Unimplemented,
                ShmError::NotFound(_) => Code::NotFound,
                ShmError::AlreadyRegistered(_) => Code::AlreadyExists,
                ShmError::NoName
                | ShmError::NameTooLong(_)
                | ShmError::BadKey(_)
                | ShmError::Open { .. }
                | ShmError::NotRegular { .. }
                | ShmError::PastObject { .. }
                | ShmError::Empty
                | ShmError::OutOfRange { .. } => Code::InvalidArgument,
                ShmError::TooManyRegions { .. }
                | ShmError::TooManyBytes { .. }
                | ShmError::Busy { .. } => Code::ResourceExhausted,
                ShmError::Shrunk { .. } => Code::FailedPrecondition,
                ShmError::Io { .. } => Code::Internal,
            },
        }
    }
}

impl ServeError {
    /// The message a client and the logs get: the error's text, no longer than
    /// [`MESSAGE_CHARS`] whatever strings the client put in its request.
    pub fn message(&self) -> String {
        excerpt(&self.to_string(), MESSAGE_CHARS)
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        Status::new(e.code(), e.message())
    }
}

/// How much of a client-supplied name an error message quotes.
pub const NAME_CHARS: usize = 64;
/// How much of a list of names (the served models) an error message quotes.
const LIST_CHARS: usize = 512;
/// The longest message a status carries.
pub const MESSAGE_CHARS: usize = 1024;

/// `s` cut to its first `max` characters, marked with an ellipsis where it was cut:
/// names and strings a client sends are quoted in messages and logs only this far.
pub fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let full = ServeError::Schedule(ScheduleError::QueueFull {
            model: "m".into(),
            capacity: 4,
        });
        assert_eq!(Status::from(full).code(), Code::ResourceExhausted);
        let bad = ServeError::Image {
            index: 2,
            source: PreprocessError::UnknownFormat,
        };
        let s = Status::from(bad);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s
            .message()
            .starts_with("image 2: unrecognised image format"));
        assert_eq!(Status::from(ServeError::Draining).code(), Code::Unavailable);
        let missing = ServeError::from(ShmError::NotFound("r".into()));
        assert_eq!(Status::from(missing).code(), Code::NotFound);
        assert_eq!(
            Status::from(ServeError::Loading("m".into())).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn client_strings_are_quoted_only_in_part() {
        let huge = "x".repeat(8 << 20);
        let s = Status::from(ServeError::UnknownModel {
            name: huge.clone(),
            available: "resnet18_swsl".into(),
        });
        assert!(s.message().len() < 200, "{}", s.message().len());
        assert!(s.message().contains("xxxx…"));
        let s = Status::from(ServeError::InvalidArgument(huge));
        assert!(s.message().chars().count() <= MESSAGE_CHARS + 1);
        assert_eq!(excerpt("héllo", 2), "hé…");
        assert_eq!(excerpt("héllo", 5), "héllo");
    }
}

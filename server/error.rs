//! Every error a request can meet, and the one place they become gRPC statuses.

use tonic::{Code, Status};

use crate::preprocess::PreprocessError;
use crate::scheduler::ScheduleError;
use crate::shm::ShmError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("unknown model '{name}'; this server serves: {available}")]
    UnknownModel { name: String, available: String },
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
            | ServeError::Schedule(ScheduleError::NonFinite { .. }) => Code::InvalidArgument,
            ServeError::Schedule(ScheduleError::QueueFull { .. }) => Code::ResourceExhausted,
            ServeError::Schedule(ScheduleError::DeadlineExceeded(_)) => Code::DeadlineExceeded,
            ServeError::Schedule(ScheduleError::Stopped(_)) | ServeError::Draining => {
                Code::Unavailable
            }
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

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        Status::new(e.code(), e.to_string())
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
    }
}

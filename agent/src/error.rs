//! The engine's error type and its mapping onto ttrpc status codes.

use ttrpc::Code;

/// An error the agent reports to its caller. The message is a sentence the
/// caller can show as is.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed or asks for something unsupported.
    #[error("{0}")]
    InvalidArgument(String),
    /// The container or process does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something failed inside the agent or the kernel.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// The ttrpc status code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::Internal(_) => Code::INTERNAL,
        }
    }

    /// Shorthand for an internal error built from anything displayable.
    pub fn internal(what: impl std::fmt::Display) -> Self {
        Self::Internal(what.to_string())
    }

    /// Shorthand for an invalid-argument error.
    pub fn invalid(what: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(what.to_string())
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::error::get_rpc_status(e.code(), e.to_string())
    }
}

/// Result of engine operations.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

//! `containerd-shim-nutshell-v2`: containerd's shim v2 task service for
//! nutshell pods, on `containerd-shim` 0.11 (task API v2, which containerd
//! 1.6 speaks).
//!
//! One shim process serves one pod: containers whose spec carries the same
//! `io.kubernetes.cri.sandbox-id` annotation reach the same shim socket
//! ([`service`]), and the shim runs one VM for them ([`pod`]). A lone
//! `ctr run` container is its own pod. Every task call maps onto the agent
//! in the guest ([`task`]); stdio is relayed between containerd's FIFOs or
//! log URIs and the agent ([`stdio`]); rootfs and volumes reach the guest
//! through the pod's virtio-fs shared directory ([`crate::mounts`]); per-pod state
//! under `/run/nutshell/<hash>/` lets `shim delete` clean up after a dead
//! shim ([`state`]).

pub mod events;
pub mod metrics;
pub mod options;
pub mod pod;
pub mod process;
pub mod service;
pub mod sizing;
pub mod state;
pub mod stdio;
pub mod task;

use containerd_shim_protos::ttrpc;

/// The runtime name containerd maps to this binary.
pub const RUNTIME_ID: &str = "io.containerd.nutshell.v2";
/// CRI's annotation naming a container's pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's annotation saying whether a container is the pod's sandbox.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// Why a task call failed; each maps onto the ttrpc status containerd
/// turns into its own error kinds (`NotFound`, `AlreadyExists`, …).
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    /// The VM could not be started or its agent not reached; the message
    /// quotes the guest console where there is one.
    #[error("{0}")]
    Vm(String),
    /// The agent refused or failed a call.
    #[error("{0}")]
    Agent(String),
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    /// Any error, with its source chain, as an internal error.
    pub fn from_err(e: impl std::error::Error) -> Self {
        Self::Internal(pod::chain(&e))
    }

    /// An agent error, keeping the agent's own status code where it gave
    /// one (an unknown id stays `NotFound`).
    pub fn agent(call: &str, e: crate::agent::AgentError) -> Self {
        let msg = format!("{call}: {}", pod::chain(&e));
        match e.rpc_code() {
            Some(ttrpc::Code::NOT_FOUND) => Self::NotFound(msg),
            Some(ttrpc::Code::ALREADY_EXISTS) => Self::AlreadyExists(msg),
            Some(ttrpc::Code::INVALID_ARGUMENT) => Self::InvalidArgument(msg),
            Some(ttrpc::Code::FAILED_PRECONDITION) => Self::FailedPrecondition(msg),
            Some(ttrpc::Code::UNIMPLEMENTED) => Self::Unimplemented(msg),
            _ => Self::Agent(msg),
        }
    }

    fn code(&self) -> ttrpc::Code {
        match self {
            Self::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Self::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Self::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Self::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Self::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Self::Vm(_) | Self::Agent(_) => ttrpc::Code::UNAVAILABLE,
            Self::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_ttrpc_codes() {
        let code = |e: ShimError| match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(ShimError::NotFound("x".into())),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            code(ShimError::Unimplemented("checkpoint".into())),
            ttrpc::Code::UNIMPLEMENTED
        );
        assert_eq!(code(ShimError::Vm("boot".into())), ttrpc::Code::UNAVAILABLE);
    }
}

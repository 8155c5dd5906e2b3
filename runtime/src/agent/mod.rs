//! The host side of the agent protocol: dial the agent (hybrid vsock or a
//! Unix socket), check its health and protocol version, then carry every
//! call of `nutshell_protocol` with a timeout (except the calls that block by
//! design) and with the VM's end as a second way out, so no call waits on a
//! dead guest.
//!
//! The agent runs in the guest, so its replies are untrusted: ttrpc bounds
//! each message at 4 MiB, the dial handshake is bounded, and replies are
//! checked where a bound is known (stdio chunks, strings). Below ttrpc, every
//! message header is checked too (`frames.rs`): a stream that breaks ttrpc's
//! framing ends the connection instead of being read on.

mod calls;
mod dial;
mod frames;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::time::Duration;

use nutshell_protocol::agent::HealthResponse;
use nutshell_protocol::agent_ttrpc;
use ttrpc::context::{self, Context};

use crate::hypervisor::{sanitize_line, VmEndWatch, VmExit};

pub use dial::{AgentAddress, DialOptions};

/// How long a call whose connection broke waits to learn whether the VM
/// ended (its processes are reaped within milliseconds of dying).
const BROKEN_LINK_GRACE: Duration = Duration::from_millis(500);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket exists but may not be used.
    #[error("cannot connect to the agent at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer before the dial deadline.
    #[error(
        "the agent at {address} did not answer within {waited:?} ({attempts} attempts; last: {last_error})"
    )]
    DialTimeout {
        address: String,
        waited: Duration,
        attempts: u32,
        last_error: String,
    },
    /// The guest's agent logged on the console that it listens, yet no
    /// dial reached it for `grace` after (a wedged vsock backend).
    #[error(
        "the agent at {address} logged that it serves, but no connection reached it within {grace:?} after"
    )]
    UnreachableWhileServing { address: String, grace: Duration },
    /// The hybrid-vsock backend answered something other than `OK <port>`.
    #[error("the hybrid vsock handshake with {address} failed: {reason}")]
    Handshake { address: String, reason: String },
    /// The VM ended while a call (or the dial) was waiting.
    #[error("the VM ended while waiting for {during}: {exit}")]
    VmEnded {
        during: &'static str,
        exit: Box<VmExit>,
    },
    /// The agent is up but does not report itself as serving.
    #[error("the agent reports status {0:?} instead of SERVING")]
    NotServing(String),
    /// The agent speaks another protocol version.
    #[error("the agent speaks protocol version {agent}, this runtime speaks {runtime}")]
    ProtocolMismatch { agent: u32, runtime: u32 },
    /// A call did not complete in time.
    #[error("agent call {call} timed out after {after:?}")]
    Timeout { call: &'static str, after: Duration },
    /// A call failed: the agent returned an error, or the connection broke.
    #[error("agent call {call} failed")]
    Rpc {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    /// The agent's reply breaks the protocol's bounds.
    #[error("agent call {call} returned an invalid reply: {reason}")]
    InvalidReply { call: &'static str, reason: String },
}

impl AgentError {
    /// The status code the agent returned, when the agent itself refused the
    /// call (for mapping onto containerd's errors, e.g. `NOT_FOUND`).
    pub fn rpc_code(&self) -> Option<ttrpc::Code> {
        match self {
            Self::Rpc {
                source: ttrpc::Error::RpcStatus(s),
                ..
            } => Some(s.code()),
            _ => None,
        }
    }

    /// The agent's own error message, when it refused the call.
    pub fn rpc_message(&self) -> Option<&str> {
        match self {
            Self::Rpc {
                source: ttrpc::Error::RpcStatus(s),
                ..
            } => Some(s.message()),
            _ => None,
        }
    }
}

/// A connected, healthy agent. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    raw: agent_ttrpc::AgentClient,
    call_timeout: Duration,
    vm_end: Option<VmEndWatch>,
    health: HealthResponse,
    /// Why the agent's stream was refused, once it was.
    refused: frames::Verdict,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent_version", &self.health.agent_version)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Dials the agent at `address` (retrying until `opts.deadline`), runs
    /// Health and checks the protocol version. With `vm_end`, the dial and
    /// every later call fail as soon as the VM ends, quoting its console.
    pub async fn connect(
        address: &AgentAddress,
        opts: &DialOptions,
        vm_end: Option<VmEndWatch>,
    ) -> Result<Self, AgentError> {
        let stream = dial::dial(address, opts, vm_end.as_ref()).await?;
        let (guarded, refused) = frames::FrameGuard::new(stream);
        let socket = ttrpc::r#async::transport::Socket::new(guarded);
        let raw = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket));
        let mut me = Self {
            raw,
            call_timeout: opts.call_timeout,
            vm_end,
            health: HealthResponse::default(),
            refused,
        };
        let health = me.health().await?;
        if health.status != "SERVING" {
            return Err(AgentError::NotServing(sanitize_line(&health.status)));
        }
        if health.protocol_version != nutshell_protocol::PROTOCOL_VERSION {
            return Err(AgentError::ProtocolMismatch {
                agent: health.protocol_version,
                runtime: nutshell_protocol::PROTOCOL_VERSION,
            });
        }
        tracing::debug!(agent_version = %sanitize_line(&health.agent_version), "agent healthy");
        me.health = health;
        Ok(me)
    }

    /// The agent's version, as its Health reported it (sanitised).
    pub fn agent_version(&self) -> String {
        sanitize_line(&self.health.agent_version)
    }

    /// Limit for each call that does not block by design.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    pub(super) fn ctx(&self, blocking: bool) -> Context {
        if blocking {
            Context::default()
        } else {
            // The agent learns the deadline too (to give up on its side); it
            // is a little later than the client's own, so a late reply is
            // always reported as our `Timeout`.
            context::with_duration(self.call_timeout + Duration::from_secs(1))
        }
    }

    /// Runs one call: bounded by the call timeout unless `blocking`, and cut
    /// short when the VM ends.
    pub(super) async fn call<T>(
        &self,
        name: &'static str,
        blocking: bool,
        fut: impl Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        let limit = self.call_timeout;
        let bounded = async {
            let r = if blocking {
                fut.await
            } else {
                tokio::time::timeout(limit, fut)
                    .await
                    .map_err(|_| AgentError::Timeout {
                        call: name,
                        after: limit,
                    })?
            };
            r.map_err(|source| match self.refused.get() {
                // The connection ended because the agent broke the framing:
                // that, not ttrpc's "closed", is what went wrong.
                Some(reason) if !matches!(source, ttrpc::Error::RpcStatus(_)) => {
                    AgentError::InvalidReply {
                        call: name,
                        reason: reason.clone(),
                    }
                }
                _ => AgentError::Rpc { call: name, source },
            })
        };
        let Some(end) = &self.vm_end else {
            return bounded.await;
        };
        let ended = |exit| AgentError::VmEnded {
            during: name,
            exit: Box::new(exit),
        };
        match tokio::select! {
            r = bounded => r,
            exit = end.wait() => return Err(ended(exit)),
        } {
            // The connection broke: when the VM is dying, its end (reaped a
            // moment later) is the error worth reporting.
            Err(AgentError::Rpc { source, .. })
                if !matches!(source, ttrpc::Error::RpcStatus(_)) =>
            {
                match tokio::time::timeout(BROKEN_LINK_GRACE, end.wait()).await {
                    Ok(exit) => Err(ended(exit)),
                    Err(_) => Err(AgentError::Rpc { call: name, source }),
                }
            }
            r => r,
        }
    }
}

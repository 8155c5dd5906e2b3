//! The client against a fake agent that lies and stalls.

use super::calls::{check_len, check_output, output_request, MAX_REPLY_STRING};
use super::*;
use nutshell_protocol::agent::{
    ContainerRequest, Empty, GuestDetailsRequest, GuestDetailsResponse, HealthRequest,
    ReadOutputRequest, ReadOutputResponse, WaitProcessRequest, WaitProcessResponse,
};
use std::sync::Arc;
use ttrpc::r#async::TtrpcContext;

#[test]
fn output_bounds_are_enforced() {
    let req = output_request("c", "", 0);
    assert_eq!(req.max_bytes, 1);
    let req = output_request("c", "", u32::MAX);
    assert_eq!(req.max_bytes, nutshell_protocol::MAX_STDIO_CHUNK);
    let r = ReadOutputResponse {
        data: vec![0; 11],
        ..Default::default()
    };
    assert!(check_output("ReadStdout", &r, 10).is_err());
    assert!(check_output("ReadStdout", &r, 11).is_ok());
    assert!(check_len("Health", "x", &"a".repeat(MAX_REPLY_STRING + 1)).is_err());
}

/// An agent that lies and stalls, to test the client's guards.
struct FakeAgent {
    protocol_version: u32,
}

#[async_trait::async_trait]
impl agent_ttrpc::Agent for FakeAgent {
    async fn health(&self, _: &TtrpcContext, _: HealthRequest) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse {
            status: "SERVING".into(),
            agent_version: "fake".into(),
            protocol_version: self.protocol_version,
            ..Default::default()
        })
    }
    async fn guest_details(
        &self,
        _: &TtrpcContext,
        _: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        Ok(GuestDetailsResponse {
            mem_total_bytes: 1,
            mem_available_bytes: 2,
            ..Default::default()
        })
    }
    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        _: ReadOutputRequest,
    ) -> ttrpc::Result<ReadOutputResponse> {
        Ok(ReadOutputResponse {
            data: vec![b'x'; 100],
            ..Default::default()
        })
    }
    async fn wait_process(
        &self,
        _: &TtrpcContext,
        _: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        std::future::pending().await
    }
    async fn pause_container(&self, _: &TtrpcContext, _: ContainerRequest) -> ttrpc::Result<Empty> {
        std::future::pending().await
    }
}

async fn serve(
    dir: &std::path::Path,
    protocol_version: u32,
) -> (ttrpc::r#async::Server, AgentAddress) {
    let path = dir.join("agent.sock");
    let service = agent_ttrpc::create_agent(Arc::new(FakeAgent { protocol_version }));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .unwrap()
        .register_service(service);
    server.start().await.unwrap();
    (server, AgentAddress::Unix(path))
}

fn opts() -> DialOptions {
    DialOptions {
        deadline: Duration::from_secs(5),
        call_timeout: Duration::from_millis(300),
        ..DialOptions::default()
    }
}

#[tokio::test]
async fn replies_out_of_bounds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
    let c = AgentClient::connect(&addr, &opts(), None).await.unwrap();
    assert_eq!(c.agent_version(), "fake");
    let e = c.guest_details().await.unwrap_err();
    assert!(matches!(e, AgentError::InvalidReply { .. }), "{e}");
    let e = c.read_stdout("c", "", 10).await.unwrap_err();
    assert!(
        e.to_string().contains("100 bytes sent for at most 10"),
        "{e}"
    );
    // Unimplemented calls carry the agent's code.
    let e = c.start_container("c").await.unwrap_err();
    assert_eq!(e.rpc_code(), Some(ttrpc::Code::NOT_FOUND));
}

/// A proxy in front of the fake agent whose link can be cut.
async fn cuttable(
    dir: &std::path::Path,
    to: AgentAddress,
) -> (AgentAddress, tokio::task::JoinHandle<()>) {
    let AgentAddress::Unix(target) = to else {
        unreachable!()
    };
    let path = dir.join("proxy.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let link = tokio::spawn(async move {
        let (mut a, _) = listener.accept().await.unwrap();
        let mut b = tokio::net::UnixStream::connect(target).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    (AgentAddress::Unix(path), link)
}

#[tokio::test]
async fn a_broken_connection_of_a_dying_vm_reports_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
    let (addr, link) = cuttable(dir.path(), addr).await;
    let (end, watch) = VmEndWatch::for_test();
    let c = AgentClient::connect(&addr, &opts(), Some(watch))
        .await
        .unwrap();
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.wait_process("c", "").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The link breaks first; the VM's end is published a moment later.
    link.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the broken link was reported before the VM's end"
    );
    end(crate::hypervisor::vm::lost_supervisor());
    let e = waiter.await.unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            AgentError::VmEnded {
                during: "WaitProcess",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_broken_connection_of_a_live_vm_is_an_rpc_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
    let (addr, link) = cuttable(dir.path(), addr).await;
    let (_end, watch) = VmEndWatch::for_test();
    let c = AgentClient::connect(&addr, &opts(), Some(watch))
        .await
        .unwrap();
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.wait_process("c", "").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    link.abort();
    let e = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("a broken link left the call hanging")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            e,
            AgentError::Rpc {
                call: "WaitProcess",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION + 1).await;
    let e = AgentClient::connect(&addr, &opts(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::ProtocolMismatch { .. }), "{e}");
}

#[tokio::test]
async fn a_stalled_call_times_out_and_a_blocking_one_ends_with_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(dir.path(), nutshell_protocol::PROTOCOL_VERSION).await;
    let (end, watch) = VmEndWatch::for_test();
    let c = AgentClient::connect(&addr, &opts(), Some(watch))
        .await
        .unwrap();
    let e = c.pause_container("c").await.unwrap_err();
    assert!(
        matches!(
            e,
            AgentError::Timeout {
                call: "PauseContainer",
                ..
            }
        ),
        "{e}"
    );

    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.wait_process("c", "").await })
    };
    // WaitProcess blocks by design: no timeout ends it...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished());
    // ...but the VM's end does, at once, with the console quoted.
    let mut exit = crate::hypervisor::vm::lost_supervisor();
    exit.console_tail = vec!["Kernel panic - not syncing".into()];
    end(exit);
    let e = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("Kernel panic - not syncing"), "{e}");
    assert!(matches!(
        e,
        AgentError::VmEnded {
            during: "WaitProcess",
            ..
        }
    ));
}

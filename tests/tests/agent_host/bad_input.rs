//! Bad requests get clear errors and the agent keeps serving: malformed
//! specs, unknown ids, duplicates, oversized messages and frames, clients
//! that go away.

use std::time::Duration;

use nutshell_protocol::agent as pb;
use serde_json::json;

use crate::agent::{container, ctx, sh, spec, status_of, Agent, CALL_TIMEOUT};

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_agent_keeps_serving() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let (code, msg) = status_of(
        &a.create("bad", &json!("not a spec"), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("malformed"), "{msg}");
    let raw = pb::CreateContainerRequest {
        container_id: "bad".into(),
        spec_json: b"{\"ociVersion\":".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        status_of(&a.client.create_container(ctx(), &raw).await.unwrap_err()).0,
        ttrpc::Code::INVALID_ARGUMENT
    );
    a.health().await;

    let mut s = sh(&a, "true");
    s["linux"]["namespaces"] = json!([{ "type": "mount" }, { "type": "user" }]);
    let (code, msg) = status_of(&a.create("userns", &s, false).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("user") && msg.contains("not supported"),
        "{msg}"
    );

    let (code, msg) = status_of(&a.start_c("nobody").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    assert!(msg.contains("nobody"), "{msg}");

    let mut s = sh(&a, "true");
    s["root"]["path"] = json!("/no/such/rootfs");
    let (code, msg) = status_of(&a.create("norootfs", &s, false).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("/no/such/rootfs"), "{msg}");

    let (code, msg) = status_of(
        &a.create("noexec", &spec(&a.rootfs(), &["/no/such/binary"]), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("/no/such/binary") && msg.contains("no such file or directory"),
        "{msg}"
    );

    // The init reports a kind with its sentence; a malformed spec it finds
    // (here while applying sysctls) is the caller's mistake, not ours.
    let mut s = sh(&a, "true");
    s["linux"]["sysctl"] = json!({ "kernel/../x": "1" });
    let (code, msg) = status_of(&a.create("badsysctl", &s, false).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("kernel/../x") && msg.contains("invalid"),
        "{msg}"
    );

    a.create("dup", &spec(&a.rootfs(), &["sleep", "100"]), false)
        .await
        .unwrap();
    let (code, _) = status_of(
        &a.create("dup", &spec(&a.rootfs(), &["sleep", "100"]), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS);
    a.start_c("dup").await.unwrap();
    let (code, msg) = status_of(
        &a.exec("dup", "x", &["/no/such/tool"], false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("/no/such/tool") && msg.contains("no such file or directory"),
        "{msg}"
    );
    let (code, _) = status_of(&a.start_c("dup").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);

    // Without cgroup v2, resources must be refused, never silently ignored.
    if !std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "))
    {
        let mut s = sh(&a, "true");
        s["linux"]["resources"] = json!({ "memory": { "limit": 67108864 } });
        let (code, msg) = status_of(&a.create("limits", &s, false).await.unwrap_err());
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        assert!(msg.contains("cgroup v2"), "{msg}");
        let (code, msg) = status_of(
            &a.client
                .pause_container(ctx(), &container("dup"))
                .await
                .unwrap_err(),
        );
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        assert!(msg.contains("cgroup v2"), "{msg}");
        assert!(a
            .client
            .stats_container(ctx(), &container("dup"))
            .await
            .is_err());
    }

    // An oversized message (over ttrpc's 4 MiB) fails; the agent serves on.
    let big = pb::CreateContainerRequest {
        container_id: "big".into(),
        spec_json: vec![b' '; 5 << 20],
        ..Default::default()
    };
    assert!(a.client.create_container(ctx(), &big).await.is_err());
    a.new_client()
        .await
        .health(ctx(), &pb::HealthRequest::new())
        .await
        .expect("a fresh client is served after an oversized message");

    // A client that goes away in the middle of a blocking read.
    {
        let c = a.new_client().await;
        let req = pb::ReadOutputRequest {
            container_id: "dup".into(),
            max_bytes: 10,
            ..Default::default()
        };
        let read = tokio::spawn(async move { c.read_stdout(ctx(), &req).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        read.abort();
    }
    a.new_client()
        .await
        .health(ctx(), &pb::HealthRequest::new())
        .await
        .unwrap();
    a.remove("dup").await;
    let (code, _) = status_of(&a.try_remove("dup").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
}

/// A protobuf length-delimited field.
fn pb_field(field: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![(field << 3) | 2];
    let mut n = data.len();
    loop {
        if n < 0x80 {
            out.push(n as u8);
            break;
        }
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.extend_from_slice(data);
    out
}

/// One raw ttrpc request frame (the client library refuses to send an
/// oversized one, so the agent's side is driven by hand).
fn ttrpc_frame(stream: u32, method: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = pb_field(1, b"nutshell.agent.v1.Agent");
    body.extend(pb_field(2, method.as_bytes()));
    body.extend(pb_field(3, payload));
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(stream.to_be_bytes());
    frame.extend([1u8, 0u8]);
    frame.extend(body);
    frame
}

fn read_frame(s: &mut std::os::unix::net::UnixStream) -> (u32, Vec<u8>) {
    use std::io::Read;
    let mut hdr = [0u8; 10];
    s.read_exact(&mut hdr).unwrap();
    let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    let stream = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (stream, body)
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_the_connection_goes_on() {
    use std::io::Write;
    let Some(a) = Agent::start().await else {
        return;
    };
    let sock = a.sock.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
        s.write_all(&ttrpc_frame(1, "CreateContainer", &vec![b'x'; 5 << 20]))
            .unwrap();
        let (stream, body) = read_frame(&mut s);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(stream, 1);
        assert!(text.contains("exceed maximum message size"), "{text}");
        s.write_all(&ttrpc_frame(3, "Health", &[])).unwrap();
        let (stream, body) = read_frame(&mut s);
        assert_eq!(stream, 3);
        assert!(String::from_utf8_lossy(&body).contains("SERVING"));
    })
    .await
    .unwrap();
    a.health().await;
}

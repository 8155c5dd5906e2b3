//! A container's stdio: stdin through a pipe, a terminal that resizes, and
//! more output than the agent buffers.

use nutshell_protocol::agent as pb;
use serde_json::json;

use crate::agent::{ctx, sh, spec, Agent};

#[tokio::test]
async fn stdin_is_piped_through_cat() {
    let Some(a) = Agent::start().await else {
        return;
    };
    a.create("cat", &spec(&a.rootfs(), &["cat"]), true)
        .await
        .unwrap();
    a.start_c("cat").await.unwrap();
    assert_eq!(a.write_stdin("cat", b"through the pipe\n").await, 17);
    a.client
        .close_stdin(
            ctx(),
            &pb::CloseStdinRequest {
                container_id: "cat".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a.read_all("cat", "", false).await, "through the pipe\n");
    assert_eq!(a.wait("cat", "").await.exit_status, 0);
    a.remove("cat").await;
}

#[tokio::test]
async fn terminal_session_with_resize() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "tty; read x; stty size; exit 0");
    s["process"]["terminal"] = json!(true);
    a.create("tty", &s, true).await.unwrap();
    a.start_c("tty").await.unwrap();
    let first = a.read_until("tty", "", "/dev/pts/").await;
    assert!(first.contains("/dev/pts/"), "tty printed {first:?}");
    let r = pb::ResizeTerminalRequest {
        container_id: "tty".into(),
        rows: 42,
        cols: 123,
        ..Default::default()
    };
    a.client.resize_terminal(ctx(), &r).await.unwrap();
    a.write_stdin("tty", b"go\n").await;
    let rest = a.read_until("tty", "", "42 123").await;
    assert!(rest.contains("42 123"), "stty size printed {rest:?}");
    assert_eq!(a.wait("tty", "").await.exit_status, 0);
    a.remove("tty").await;
}

#[tokio::test]
async fn large_output_arrives_intact() {
    let Some(a) = Agent::start().await else {
        return;
    };
    // 8 MiB of numbered lines: more than the agent buffers, so the
    // container blocks until the reads catch up.
    a.run("big", &sh(&a, "seq 1 2000000 | head -c 8388608"))
        .await;
    let out = a.read_all("big", "", false).await;
    assert_eq!(out.len(), 8 << 20);
    assert!(out.starts_with("1\n2\n3\n"));
    let expected: String = (1..=2_000_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out, expected[..8 << 20]);
    assert_eq!(a.wait("big", "").await.exit_status, 0);
    a.remove("big").await;
}

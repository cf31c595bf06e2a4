//! The client against a scripted fake monitor: what it sends is checked, what it gets
//! back is decided by the test.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmp_client::{CommandError, Error, QmpClient};
use serde_json::{Value, json};

const GREETING: &str =
    r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": []}}"#;

/// A monitor that sends `before` lines, then answers each command it reads with
/// `answer(command)` (lines to send; the `{id}` in them is replaced by the command's
/// id); returns the commands it read.
fn monitor(
    before: Vec<String>,
    answer: impl Fn(&Value) -> Vec<String> + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<Vec<Value>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        for line in before {
            writeln!(out, "{line}").unwrap();
        }
        let mut seen = Vec::new();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let command: Value = serde_json::from_str(&line).unwrap();
            let id = command["id"].to_string();
            for reply in answer(&command) {
                if writeln!(out, "{}", reply.replace("{id}", &id)).is_err() {
                    break;
                }
            }
            seen.push(command);
        }
        seen
    });
    (dir, path, handle)
}

fn ok_reply() -> String {
    r#"{"return": {}, "id": {id}}"#.to_owned()
}

#[test]
fn leftovers_before_the_greeting_are_skipped_and_replies_match_their_ids() {
    let before = vec![
        r#"{"return": {}, "id": "a-killed-client-1"}"#.to_owned(),
        r#"{"event": "SHUTDOWN", "data": {}}"#.to_owned(),
        GREETING.to_owned(),
    ];
    let (_dir, path, server) = monitor(before, |c| match c["execute"].as_str() {
        Some("query-jobs") => vec![
            r#"{"return": [], "id": "someone-else"}"#.to_owned(),
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"id": "j"}}"#.to_owned(),
            r#"{"return": [{"id": "j"}], "id": {id}}"#.to_owned(),
        ],
        _ => vec![ok_reply()],
    });
    let mut q = QmpClient::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(q.greeting()["QMP"]["version"]["qemu"]["major"], 10);
    q.set_id_prefix("t");
    assert_eq!(q.execute("query-jobs", Value::Null).unwrap(), json!([{"id": "j"}]));
    // The event that came with the reply is kept; so is the reply that was not ours.
    assert_eq!(q.events().len(), 1);
    let ev = q.wait_event(Duration::from_millis(10), |e| e["event"] == "JOB_STATUS_CHANGE");
    assert_eq!(ev.unwrap().unwrap()["data"]["id"], "j");
    assert_eq!(q.recv().unwrap()["id"], "someone-else");
    q.execute("stop", json!({"x": 1})).unwrap();
    drop(q);
    let seen = server.join().unwrap();
    let names: Vec<&str> = seen.iter().map(|c| c["execute"].as_str().unwrap()).collect();
    assert_eq!(names, ["qmp_capabilities", "query-jobs", "stop"]);
    assert_eq!(seen[1]["id"], "t-2");
    assert!(seen[1].get("arguments").is_none(), "Null arguments are omitted");
    assert_eq!(seen[2]["arguments"], json!({"x": 1}));
}

#[test]
fn an_error_reply_is_a_command_error() {
    let (_dir, path, _server) = monitor(vec![GREETING.to_owned()], |c| {
        if c["execute"] == "qmp_capabilities" {
            vec![ok_reply()]
        } else {
            vec![r#"{"error": {"class": "GenericError", "desc": "no"}, "id": {id}}"#.to_owned()]
        }
    });
    let mut q = QmpClient::connect(&path, Duration::from_secs(5)).unwrap();
    let e = q.execute("blockdev-del", json!({"node-name": "x"})).unwrap_err();
    assert_eq!(e.command_error(), Some(&CommandError::new("GenericError", "no")));
    assert_eq!(e.to_string(), "QMP blockdev-del: GenericError: no");
}

#[test]
fn a_silent_daemon_times_out() {
    let (_dir, path, _server) = monitor(vec![GREETING.to_owned()], |c| {
        if c["execute"] == "qmp_capabilities" { vec![ok_reply()] } else { Vec::new() }
    });
    let mut q = QmpClient::connect(&path, Duration::from_secs(5)).unwrap();
    q.set_timeout(Duration::from_millis(200));
    let t = Instant::now();
    let e = q.execute("query-jobs", Value::Null).unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(200) && t.elapsed() < Duration::from_secs(3));
    assert_eq!(q.wait_event(Duration::from_millis(50), |_| true).unwrap(), None);
}

#[test]
fn a_closed_connection_and_garbage_are_errors() {
    let (_dir, path, _server) = monitor(vec![GREETING.to_owned()], |_| Vec::new());
    let mut q = QmpClient::connect_unnegotiated(&path, Duration::from_secs(5)).unwrap();
    q.set_timeout(Duration::from_millis(100));
    assert!(matches!(q.negotiate(), Err(Error::TimedOut { .. })));

    let (_dir2, path2, _s2) = monitor(vec!["not json".to_owned()], |_| Vec::new());
    let e = QmpClient::connect(&path2, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, Error::Protocol { .. }), "{e}");

    let (_dir3, path3, _s3) = monitor(vec![r#"{"something": "else"}"#.to_owned()], |_| Vec::new());
    let e = QmpClient::connect(&path3, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("expected a QMP greeting"), "{e}");

    // A monitor that closes the connection instead of answering.
    let dir4 = tempfile::tempdir().unwrap();
    let path4 = dir4.path().join("qmp.sock");
    let listener = UnixListener::bind(&path4).unwrap();
    let closer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        writeln!(s, "{GREETING}").unwrap();
        // Read the capabilities command, then close without answering.
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
    });
    let e = QmpClient::connect(&path4, Duration::from_secs(5)).unwrap_err();
    closer.join().unwrap();
    assert!(matches!(e, Error::Closed { .. }), "{e}");
}

#[test]
fn a_missing_socket_is_retried_until_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let e =
        QmpClient::connect(dir.path().join("none.sock"), Duration::from_millis(150)).unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert!(e.to_string().contains("none.sock"), "{e}");
}

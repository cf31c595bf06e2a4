//! Tests of the harness itself, against a real `qemu-storage-daemon`.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::qmp::QmpError;
use testkit::qsd::StorageDaemon;
use testkit::{find_tool, require_tool, run, run_timeout};

#[test]
fn require_tool_finds_programs_on_path() {
    let sh = require_tool("sh");
    assert!(sh.is_absolute(), "{}", sh.display());
    assert_eq!(find_tool(sh.to_str().unwrap()), Some(sh));
    assert_eq!(find_tool("testkit-no-such-tool"), None);
}

#[test]
#[should_panic(expected = "required tool `testkit-no-such-tool` was not found on PATH")]
fn require_tool_panics_when_missing() {
    require_tool("testkit-no-such-tool");
}

#[test]
#[should_panic(expected = "install the Debian package `qemu-utils`")]
fn require_tool_names_the_package() {
    // A name that cannot be on PATH, but whose package is known.
    require_tool("/nonexistent/qemu-img");
}

#[test]
fn run_returns_stdout_and_reports_stderr() {
    let out = run(Command::new("sh").args(["-c", "echo out; echo err >&2"])).unwrap();
    assert_eq!(out, "out\n");
    let error = run(Command::new("sh").args(["-c", "echo out; echo 'it broke' >&2; exit 3"]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("it broke"), "{error}");
    assert!(error.contains("exit status: 3"), "{error}");
    assert!(error.contains("sh -c 'echo out;"), "{error}");
    let error = run(&mut Command::new("/nonexistent/program")).unwrap_err().to_string();
    assert!(error.contains("cannot start `/nonexistent/program`"), "{error}");
}

#[test]
fn run_kills_a_command_that_hangs() {
    let error = run_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    assert!(error.contains("timed out after"), "{error}");
}

#[test]
fn start_query_version_quit() {
    let mut daemon = StorageDaemon::qemu().start().unwrap();
    let greeting = daemon.qmp().greeting().clone();
    let version = daemon.execute_ok("query-version", Value::Null);
    assert_eq!(version["qemu"], greeting["QMP"]["version"]["qemu"]);
    assert!(version["qemu"]["major"].as_u64().unwrap() >= 10, "{version}");
    let pid_file = std::fs::read_to_string(daemon.path(testkit::qsd::PID_FILE)).unwrap();
    assert_eq!(pid_file.trim(), daemon.pid().to_string());
    let status = daemon.quit().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn daemon_runs_in_its_own_process_group() {
    let daemon = StorageDaemon::qemu().start().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid())).unwrap();
    // Fields after the parenthesized command name: state, ppid, pgrp, session, ...
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    assert_eq!(fields[2], daemon.pid().to_string(), "pgrp in {stat}");
}

#[test]
fn drop_stops_the_process() {
    let daemon = StorageDaemon::qemu().start().unwrap();
    let pid = daemon.pid();
    let dir = daemon.dir().to_path_buf();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(daemon);
    // Reaped, so gone from /proc (not a zombie), and its directory is removed.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
}

#[test]
fn stop_sends_sigterm() {
    let daemon = StorageDaemon::qemu().start().unwrap();
    let status = daemon.stop().unwrap();
    // qemu-storage-daemon exits cleanly on SIGTERM.
    assert!(status.success(), "{status}");
}

#[test]
fn start_failure_reports_the_log() {
    let error = StorageDaemon::qemu()
        .args(["--blockdev", "driver=testkit-nosuch,node-name=x"])
        .start()
        .unwrap_err();
    let text = format!("{error:#}");
    assert!(text.contains("exited early"), "{text}");
    assert!(text.contains("testkit-nosuch"), "{text}");
}

#[test]
fn qmp_errors_are_values() {
    let mut daemon = StorageDaemon::qemu().start().unwrap();
    let qmp = daemon.qmp();
    assert_eq!(
        qmp.execute("testkit-nosuch", Value::Null),
        Err(QmpError::new("CommandNotFound", "The command testkit-nosuch has not been found"))
    );
    assert_eq!(
        qmp.execute("block-dirty-bitmap-add", json!({"node": "nosuch", "name": "x"})),
        Err(QmpError::new("GenericError", "Cannot find device='nosuch' nor node-name='nosuch'"))
    );
    // The connection is still usable.
    qmp.execute("query-version", Value::Null).unwrap();
}

#[test]
fn raw_send_and_recv() {
    let mut daemon = StorageDaemon::qemu().start().unwrap();
    let qmp = daemon.qmp();
    qmp.send_raw(b"{garbage}\n[1]\n").unwrap();
    let first = QmpError::from_reply(&qmp.recv().unwrap());
    assert_eq!(
        first,
        Some(QmpError::new("GenericError", "JSON parse error, invalid keyword 'garbage'"))
    );
    let second = QmpError::from_reply(&qmp.recv().unwrap());
    assert_eq!(second, Some(QmpError::new("GenericError", "QMP input must be a JSON object")));
    // A reply to a raw send is kept for recv even if execute reads past it.
    qmp.send(&json!({"execute": "query-version", "id": 42})).unwrap();
    qmp.execute("query-version", Value::Null).unwrap();
    let reply = qmp.recv().unwrap();
    assert_eq!(reply["id"], 42);
    assert!(reply["return"]["qemu"].is_object(), "{reply}");
    // Nothing more to read: recv times out rather than hanging.
    qmp.set_timeout(Duration::from_millis(200));
    let error = qmp.recv().unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
}

#[test]
fn reconnect_without_negotiation() {
    let mut daemon = StorageDaemon::qemu().start().unwrap();
    let qmp = daemon.connect_qmp(false).unwrap();
    assert_eq!(
        qmp.execute("query-version", Value::Null),
        Err(QmpError::new(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        ))
    );
    qmp.negotiate().unwrap();
    qmp.execute("query-version", Value::Null).unwrap();
    // A fresh negotiated connection works too.
    daemon.connect_qmp(true).unwrap().execute("query-version", Value::Null).unwrap();
    assert!(daemon.quit().unwrap().success());
}

#[test]
fn events_are_collected() {
    let mut daemon = StorageDaemon::qemu().start().unwrap();
    let file = daemon.path("created.img");
    let qmp = daemon.qmp();
    qmp.execute(
        "blockdev-create",
        json!({"job-id": "c0", "options": {"driver": "file", "filename": file, "size": 0}}),
    )
    .unwrap();
    let concluded = loop {
        let event = qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(10));
        assert_eq!(event["data"]["id"], "c0", "{event}");
        if event["data"]["status"] == "concluded" {
            break event;
        }
    };
    assert!(concluded["timestamp"].is_object(), "{concluded}");
    assert!(file.exists());
    qmp.execute("job-dismiss", json!({"id": "c0"})).unwrap();
    let missing = qmp.try_wait_event("testkit-never", Duration::from_millis(100)).unwrap();
    assert_eq!(missing, None);
}

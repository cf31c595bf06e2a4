//! Differential test of the job layer against qemu-storage-daemon: the same script of
//! job commands runs against QEMU's blockdev-backup jobs (raw 4 MiB images) and against
//! a `JobRegistry` with a fake driver that copies like QEMU's backup does here (1 MiB
//! per step, then the rate-limit sleep). Every reply (texts and classes) and the whole
//! event sequence must be equal.
//!
//! QEMU sends some events before and some after the reply of the command that caused
//! them, depending on timing; replies and events are therefore compared as two
//! separate sequences. Fails, never skips, when qemu-storage-daemon is missing.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockdelta::jobs::{
    ErrorAction, IoOperation, JobContext, JobDriver, JobError, JobFailure, JobOptions, JobRegistry,
    JobType, OnError,
};
use serde_json::{Value, json};
use testkit::qsd::StorageDaemon;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

enum Step {
    /// A QMP command; its reply goes to the transcript.
    Cmd(&'static str, Value),
    /// Wait for an event (not in the transcript).
    Wait(&'static str),
    /// Wait for `JOB_STATUS_CHANGE {id, status}`.
    WaitStatus(&'static str, &'static str),
    /// Wait until the job has copied its first MiB (QEMU's first step).
    Progress(&'static str),
}

use Step::{Cmd, Progress, Wait, WaitStatus};

fn backup(id: &str, device: &str, target: &str, extra: Value) -> Step {
    let mut args = json!({"job-id": id, "device": device, "target": target, "sync": "full"});
    if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    Cmd("blockdev-backup", args)
}

fn script() -> Vec<Step> {
    vec![
        // Ids, before any job exists.
        backup("", "src", "tgt", json!({})),
        backup("1x", "src", "tgt", json!({})),
        backup("a b", "src", "tgt", json!({})),
        backup("neg", "src", "tgt", json!({"speed": -1})),
        // A rate-limited job with manual finalize and dismiss.
        backup(
            "j0",
            "src",
            "tgt",
            json!({"speed": 65536, "auto-finalize": false, "auto-dismiss": false}),
        ),
        Progress("j0"),
        Cmd("job-complete", json!({"id": "j0"})),
        Cmd("block-job-complete", json!({"device": "j0"})),
        Cmd("job-finalize", json!({"id": "j0"})),
        Cmd("job-dismiss", json!({"id": "j0"})),
        Cmd("job-resume", json!({"id": "j0"})),
        Cmd("job-pause", json!({"id": "j0"})),
        Cmd("job-pause", json!({"id": "j0"})),
        Cmd("block-job-pause", json!({"device": "j0"})),
        Cmd("block-job-cancel", json!({"device": "j0"})),
        Cmd("block-job-set-speed", json!({"device": "j0", "speed": -1})),
        Cmd("block-job-set-speed", json!({"device": "j0", "speed": 1048576})),
        Cmd("query-jobs", json!({})),
        Cmd("query-block-jobs", json!({})),
        Cmd("job-resume", json!({"id": "j0"})),
        Cmd("block-job-resume", json!({"device": "j0"})),
        Cmd("block-job-set-speed", json!({"device": "j0", "speed": 0})),
        Wait("BLOCK_JOB_PENDING"),
        Cmd("query-jobs", json!({})),
        Cmd("query-block-jobs", json!({})),
        Cmd("job-pause", json!({"id": "j0"})),
        Cmd("job-resume", json!({"id": "j0"})),
        Cmd("block-job-set-speed", json!({"device": "j0", "speed": -1})),
        Cmd("job-dismiss", json!({"id": "j0"})),
        Cmd("job-finalize", json!({"id": "j0"})),
        Cmd("job-cancel", json!({"id": "j0"})),
        Cmd("block-job-finalize", json!({"id": "j0"})),
        Cmd("query-block-jobs", json!({})),
        backup("j0", "src", "tgt", json!({})),
        Cmd("block-job-dismiss", json!({"id": "j0"})),
        Cmd("job-cancel", json!({"id": "j0"})),
        Cmd("block-job-cancel", json!({"device": "j0"})),
        Cmd("block-job-set-speed", json!({"device": "j0", "speed": 0})),
        Cmd("job-finalize", json!({"id": "nosuch"})),
        Cmd("block-job-finalize", json!({"id": "nosuch"})),
        // Cancel in PENDING: the abort path, error "Operation canceled".
        backup("j1", "src", "tgt", json!({"auto-finalize": false, "auto-dismiss": false})),
        Wait("BLOCK_JOB_PENDING"),
        Cmd("block-job-cancel", json!({"device": "j1"})),
        Cmd("query-jobs", json!({})),
        Cmd("query-block-jobs", json!({})),
        Cmd("job-dismiss", json!({"id": "j1"})),
        // on-source-error=stop: a read error pauses the job until job-resume.
        backup(
            "j2",
            "bad",
            "tgt",
            json!({"on-source-error": "stop", "x-perf": {"max-workers": 1}}),
        ),
        Wait("BLOCK_JOB_ERROR"),
        WaitStatus("j2", "paused"),
        Cmd("query-block-jobs", json!({})),
        Cmd("block-job-cancel", json!({"device": "j2"})),
        Cmd("job-pause", json!({"id": "j2"})),
        Cmd("job-resume", json!({"id": "j2"})),
        WaitStatus("j2", "null"),
        // Cancel of a running job.
        backup("j3", "src", "tgt", json!({"speed": 65536})),
        Progress("j3"),
        Cmd("job-cancel", json!({"id": "j3"})),
        WaitStatus("j3", "null"),
    ]
}

fn render_event(name: &str, data: &Value) -> String {
    if name == "JOB_STATUS_CHANGE" {
        format!("{}:{}", data["id"].as_str().unwrap_or("?"), data["status"].as_str().unwrap_or("?"))
    } else {
        format!("{name} {data}")
    }
}

fn matches(ev: &str, step: &Step) -> bool {
    match step {
        Wait(name) => ev.split(' ').next() == Some(*name),
        WaitStatus(id, status) => ev == format!("{id}:{status}"),
        _ => false,
    }
}

fn render_reply(r: Result<Value, (String, String)>) -> String {
    match r {
        Ok(v) => v.to_string(),
        Err((class, desc)) => json!({"class": class, "desc": desc}).to_string(),
    }
}

/// Runs the script on qemu-storage-daemon: (transcript, events).
fn run_qemu() -> (Vec<String>, Vec<String>) {
    let b = StorageDaemon::qemu();
    let dir = b.dir().to_owned();
    let image = |name: &str, fill: u8| {
        let p = dir.join(name);
        std::fs::write(&p, vec![fill; SIZE as usize]).unwrap();
        p
    };
    let (src, tgt, bad) = (image("src.img", 1), image("tgt.img", 0), image("bad.img", 2));
    let node = |name: &str, path: &Path| {
        format!("driver=file,node-name={name},filename={}", path.display())
    };
    let mut d = b
        .args(["--blockdev", &node("src", &src), "--blockdev", &node("tgt", &tgt)])
        .start()
        .unwrap();
    // The stop scenario's source: a read error at 512 KiB, once.
    d.execute_ok(
        "blockdev-add",
        json!({"node-name": "bad", "driver": "raw", "file": {"driver": "blkdebug",
               "image": {"driver": "file", "filename": bad.display().to_string()},
               "inject-error": [{"event": "read_aio", "errno": 5, "sector": 1024,
                                 "once": true, "immediately": false}]}}),
    );
    let qmp = d.qmp();
    let mut transcript = Vec::new();
    let mut events: Vec<String> = Vec::new();
    let mut cursor = 0;
    let collect = |qmp: &mut testkit::qmp::QmpClient, events: &mut Vec<String>| {
        for e in qmp.take_events() {
            events.push(render_event(e["event"].as_str().unwrap_or(""), &e["data"]));
        }
    };
    for step in script() {
        match &step {
            Cmd(name, args) => {
                let r = qmp.execute(name, args.clone()).map_err(|e| (e.class, e.desc));
                transcript.push(format!("-> {name} {args}"));
                transcript.push(format!("<- {}", render_reply(r)));
                collect(qmp, &mut events);
            }
            Wait(_) | WaitStatus(..) => loop {
                collect(qmp, &mut events);
                if let Some(i) = events[cursor..].iter().position(|e| matches(e, &step)) {
                    cursor += i + 1;
                    break;
                }
                qmp.try_wait_event("__none__", Duration::from_millis(50)).unwrap();
            },
            Progress(id) => loop {
                let jobs = qmp.execute("query-jobs", json!({})).unwrap();
                let done =
                    jobs.as_array().into_iter().flatten().any(|j| {
                        j["id"] == *id && j["current-progress"].as_u64().unwrap_or(0) >= MIB
                    });
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            },
        }
    }
    collect(qmp, &mut events);
    d.quit().unwrap();
    (transcript, events)
}

/// Copies like QEMU's backup of a raw 4 MiB image: 1 MiB per step, then the rate limit.
struct Copier {
    fail_once: Mutex<Option<u64>>,
}

impl JobDriver for Copier {
    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        ctx.set_total(SIZE);
        let mut off = 0;
        while off < SIZE {
            ctx.pause_point().await;
            if ctx.is_cancelled() {
                return Ok(());
            }
            let fail = {
                let mut f = self.fail_once.lock().unwrap();
                if *f == Some(off) { f.take() } else { None }
            };
            if fail.is_some() {
                let e = io::Error::from_raw_os_error(5);
                match ctx.error_action(IoOperation::Read, &e) {
                    ErrorAction::Report => return Err(JobFailure::io(&e)),
                    ErrorAction::Ignore => continue,
                    ErrorAction::Stop => {
                        ctx.pause_point().await;
                        continue;
                    }
                }
            }
            ctx.add_progress(MIB);
            off += MIB;
            ctx.rate_limit(MIB).await;
        }
        Ok(())
    }
}

fn qmp_err(e: JobError) -> (String, String) {
    (e.class().to_owned(), e.to_string())
}

/// The commands of the script, over a `JobRegistry` (what the QMP layer will do).
async fn execute(reg: &JobRegistry, name: &str, a: &Value) -> Result<Value, (String, String)> {
    let s = |k: &str| a[k].as_str().unwrap_or("").to_owned();
    let ok = |r: Result<(), JobError>| r.map(|()| json!({})).map_err(qmp_err);
    match name {
        "blockdev-backup" => {
            let mut o = JobOptions::new(s("job-id"), JobType::Backup);
            o.speed = a["speed"].as_i64().unwrap_or(0);
            o.auto_finalize = a["auto-finalize"].as_bool().unwrap_or(true);
            o.auto_dismiss = a["auto-dismiss"].as_bool().unwrap_or(true);
            if let Some(p) = a["on-source-error"].as_str() {
                o.on_source_error = p.parse::<OnError>().unwrap();
            }
            // The stop scenario's source fails its first read (QEMU: blkdebug at 512 KiB,
            // inside the first MiB).
            let fail = (s("device") == "bad").then_some(0);
            let driver = Copier { fail_once: Mutex::new(fail) };
            // QEMU creates and starts the job inside a drained section.
            let mut drain = reg.drain_all().await;
            let job = reg.create(o, driver).map_err(qmp_err)?;
            drain.include(&job);
            job.start().map_err(qmp_err)?;
            drop(drain);
            Ok(json!({}))
        }
        "query-jobs" => Ok(reg.query_jobs()),
        "query-block-jobs" => Ok(reg.query_block_jobs()),
        _ => {
            let (verb, job) = if let Some(v) = name.strip_prefix("block-job-") {
                let key = if matches!(v, "finalize" | "dismiss") { "id" } else { "device" };
                (v, reg.block_job(&s(key)).map_err(qmp_err)?)
            } else {
                let v = name.strip_prefix("job-").unwrap_or(name);
                (v, reg.job(&s("id")).map_err(qmp_err)?)
            };
            let block = name.starts_with("block-job-");
            match verb {
                "pause" => ok(job.pause().await),
                "resume" => ok(job.resume().await),
                "cancel" if block => {
                    ok(job.block_job_cancel(a["force"].as_bool().unwrap_or(false)).await)
                }
                "cancel" => ok(job.cancel(true).await),
                "complete" => ok(job.complete().await),
                "finalize" => ok(job.finalize().await),
                "dismiss" => ok(job.dismiss().await),
                "set-speed" => ok(job.set_speed(a["speed"].as_i64().unwrap_or(0)).await),
                _ => panic!("no such command in the script: {name}"),
            }
        }
    }
}

/// Runs the script on a `JobRegistry` with tokio's paused clock: (transcript, events).
fn run_ours() -> (Vec<String>, Vec<String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let events = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = events.clone();
        let reg = JobRegistry::new(Arc::new(move |name: &'static str, data: Value| {
            sink.lock().unwrap().push(render_event(name, &data));
        }));
        let mut transcript = Vec::new();
        let mut cursor = 0;
        for step in script() {
            match &step {
                Cmd(name, args) => {
                    let r = execute(&reg, name, args).await;
                    transcript.push(format!("-> {name} {args}"));
                    transcript.push(format!("<- {}", render_reply(r)));
                }
                Wait(_) | WaitStatus(..) => loop {
                    let found =
                        events.lock().unwrap()[cursor..].iter().position(|e| matches(e, &step));
                    if let Some(i) = found {
                        cursor += i + 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                },
                Progress(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        let events = events.lock().unwrap().clone();
        (transcript, events)
    })
}

#[test]
fn job_verbs_and_events_match_qemu() {
    let (qemu_transcript, qemu_events) = run_qemu();
    let (our_transcript, our_events) = run_ours();
    for (q, o) in qemu_transcript.iter().zip(&our_transcript) {
        assert_eq!(o, q, "\nQEMU transcript:\n{}", qemu_transcript.join("\n"));
    }
    assert_eq!(our_transcript.len(), qemu_transcript.len());
    assert_eq!(
        our_events,
        qemu_events,
        "\nQEMU events:\n{}\nours:\n{}",
        qemu_events.join("\n"),
        our_events.join("\n")
    );
}

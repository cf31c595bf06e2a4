//! The job layer with a fake driver: every verb in every state a job stays in, the
//! event sequences, transactions, error policies and the rate limit.
//!
//! Expected sequences and texts are QEMU 10.0.2's, taken from qemu-storage-daemon
//! running blockdev-backup jobs on small raw images (see `jobs_qemu.rs` for the part
//! that is compared live; the rest was recorded by hand, and each test says what QEMU
//! showed). All tests run on tokio's paused clock, so timing is exact.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockdelta::jobs::{
    ErrorAction, IoOperation, Job, JobContext, JobDriver, JobError, JobFailure, JobOptions,
    JobRegistry, JobStatus, JobType, OnError,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------
// Harness

#[derive(Default)]
struct Events(Mutex<Vec<String>>);

impl Events {
    /// Takes the events so far: `id:status` for JOB_STATUS_CHANGE, `NAME {data}`
    /// (keys sorted) for the others.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn registry() -> (JobRegistry, Arc<Events>) {
    let events = Arc::new(Events::default());
    let sink = events.clone();
    let reg = JobRegistry::new(Arc::new(move |name: &'static str, data: Value| {
        let line = if name == "JOB_STATUS_CHANGE" {
            format!("{}:{}", data["id"].as_str().unwrap(), data["status"].as_str().unwrap())
        } else {
            format!("{name} {data}")
        };
        sink.0.lock().unwrap().push(line);
    }));
    (reg, events)
}

/// Lets every task run until all wait (the paused clock moves 1 ms).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[derive(Default, Clone)]
struct Cfg {
    total: u64,
    chunk: u64,
    /// Wait (idle) for `Fake::open` before copying.
    gated: bool,
    /// Fail once at this offset.
    fail: Option<(u64, IoOperation, i32)>,
    fail_prepare: bool,
    panic: bool,
}

/// A driver that "copies" `total` bytes in `chunk`s, with a pause point and the rate
/// limit per chunk, and logs its hooks.
#[derive(Clone)]
struct Fake(Arc<FakeInner>);

struct FakeInner {
    cfg: Cfg,
    gate: watch::Sender<bool>,
    fail: Mutex<Option<(u64, IoOperation, i32)>>,
    log: Mutex<Vec<&'static str>>,
}

impl Fake {
    fn new(cfg: Cfg) -> Self {
        let fail = cfg.fail;
        Fake(Arc::new(FakeInner {
            cfg,
            gate: watch::channel(false).0,
            fail: Mutex::new(fail),
            log: Mutex::new(Vec::new()),
        }))
    }

    fn quick() -> Self {
        Fake::new(Cfg { total: 65536, chunk: 65536, ..Cfg::default() })
    }

    fn gated() -> Self {
        Fake::new(Cfg { total: 65536, chunk: 65536, gated: true, ..Cfg::default() })
    }

    fn open(&self) {
        self.0.gate.send_replace(true);
    }

    fn log(&self) -> Vec<&'static str> {
        self.0.log.lock().unwrap().clone()
    }

    fn note(&self, what: &'static str) {
        self.0.log.lock().unwrap().push(what);
    }

    fn take_failure(&self, off: u64) -> Option<(IoOperation, i32)> {
        let mut f = self.0.fail.lock().unwrap();
        match *f {
            Some((at, op, errno)) if at == off => {
                *f = None;
                Some((op, errno))
            }
            _ => None,
        }
    }
}

impl JobDriver for Fake {
    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let cfg = &self.0.cfg;
        ctx.set_total(cfg.total);
        if cfg.panic {
            panic!("fake driver panics on purpose");
        }
        if cfg.gated {
            let mut rx = self.0.gate.subscribe();
            if ctx.wait_for(async move { rx.wait_for(|open| *open).await.is_ok() }).await.is_none()
            {
                return Ok(());
            }
        }
        let mut off = 0;
        while off < cfg.total {
            ctx.pause_point().await;
            if ctx.is_cancelled() {
                return Ok(());
            }
            if let Some((op, errno)) = self.take_failure(off) {
                let err = io::Error::from_raw_os_error(errno);
                match ctx.error_action(op, &err) {
                    ErrorAction::Report => return Err(JobFailure::io(&err)),
                    ErrorAction::Ignore => continue,
                    ErrorAction::Stop => {
                        ctx.pause_point().await;
                        continue;
                    }
                }
            }
            let n = cfg.chunk.min(cfg.total - off);
            ctx.add_progress(n);
            off += n;
            ctx.rate_limit(n).await;
        }
        Ok(())
    }

    async fn prepare(&self) -> Result<(), JobFailure> {
        self.note("prepare");
        if self.0.cfg.fail_prepare {
            return Err(JobFailure::new("prepare failed"));
        }
        Ok(())
    }

    async fn commit(&self) {
        self.note("commit");
    }

    async fn abort(&self) {
        self.note("abort");
    }

    async fn clean(&self) {
        self.note("clean");
    }
}

fn opts(id: &str) -> JobOptions {
    JobOptions::new(id, JobType::Backup)
}

fn manual(id: &str) -> JobOptions {
    let mut o = opts(id);
    o.auto_finalize = false;
    o.auto_dismiss = false;
    o
}

/// Creates and starts jobs as a QMP transaction does in QEMU: inside a drained section,
/// started in reverse order (transaction commit order), then the drain ends.
async fn start_all(reg: &JobRegistry, jobs: Vec<(JobOptions, Fake)>) -> Vec<Job> {
    let mut drain = reg.drain_all().await;
    let mut created = Vec::new();
    for (o, d) in jobs {
        let job = reg.create(o, d).unwrap();
        drain.include(&job);
        created.push(job);
    }
    for job in created.iter().rev() {
        job.start().unwrap();
    }
    drop(drain);
    created
}

async fn start(reg: &JobRegistry, o: JobOptions, d: Fake) -> Job {
    start_all(reg, vec![(o, d)]).await.remove(0)
}

fn err<T: std::fmt::Debug>(r: Result<T, JobError>) -> String {
    r.unwrap_err().to_string()
}

fn verb_error(id: &str, state: &str, verb: &str) -> String {
    format!("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")
}

const START: [&str; 4] = ["j0:created", "j0:running", "j0:paused", "j0:running"];

fn seq(prefix: &[&str], rest: &[&str]) -> Vec<String> {
    prefix.iter().chain(rest).map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------
// Event sequences

/// QEMU: `created, running, paused, running, waiting, pending, BLOCK_JOB_COMPLETED,
/// concluded, null`.
#[tokio::test(start_paused = true)]
async fn success_auto() {
    let (reg, ev) = registry();
    let d = Fake::quick();
    let job = start(&reg, opts("j0"), d.clone()).await;
    job.wait_finished().await;
    assert_eq!(
        ev.take(),
        seq(
            &START,
            &[
                "j0:waiting",
                "j0:pending",
                r#"BLOCK_JOB_COMPLETED {"device":"j0","len":65536,"offset":65536,"speed":0,"type":"backup"}"#,
                "j0:concluded",
                "j0:null",
            ]
        )
    );
    assert_eq!(d.log(), ["prepare", "commit", "clean"]);
    assert_eq!(reg.query_jobs(), json!([]));
    assert_eq!(err(job.pause().await), "Job not found");
    // The id is free again.
    reg.check_new_id("j0").unwrap();
}

/// QEMU (auto-finalize=false, auto-dismiss=false): `... waiting, pending`,
/// `BLOCK_JOB_PENDING`; verbs in PENDING refused with these texts; job-finalize →
/// `BLOCK_JOB_COMPLETED, concluded`; job-dismiss → `null`. Queries as QEMU's.
#[tokio::test(start_paused = true)]
async fn manual_finalize_and_dismiss() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg { total: 4 << 20, chunk: 1 << 20, ..Cfg::default() });
    let job = start(&reg, manual("j0"), d.clone()).await;
    job.wait_status(JobStatus::Pending).await;
    assert_eq!(
        ev.take(),
        seq(
            &START,
            &["j0:waiting", "j0:pending", r#"BLOCK_JOB_PENDING {"id":"j0","type":"backup"}"#]
        )
    );
    assert_eq!(
        reg.query_jobs(),
        json!([{"current-progress": 4194304, "id": "j0", "status": "pending",
                "total-progress": 4194304, "type": "backup"}])
    );
    assert_eq!(
        reg.query_block_jobs(),
        json!([{"auto-dismiss": false, "auto-finalize": false, "busy": false, "device": "j0",
                "io-status": "ok", "len": 4194304, "offset": 4194304, "paused": false,
                "ready": false, "speed": 0, "status": "pending", "type": "backup"}])
    );
    assert_eq!(err(job.dismiss().await), verb_error("j0", "pending", "dismiss"));
    assert_eq!(err(job.pause().await), verb_error("j0", "pending", "pause"));
    assert_eq!(err(job.set_speed(1).await), verb_error("j0", "pending", "set-speed"));
    // The verb table comes before the sign check.
    assert_eq!(err(job.set_speed(-1).await), verb_error("j0", "pending", "set-speed"));
    assert_eq!(err(job.resume().await), "Can't resume a job that was not paused");
    assert_eq!(err(job.complete().await), verb_error("j0", "pending", "complete"));
    assert!(d.log().is_empty(), "nothing settles before finalize");

    job.finalize().await.unwrap();
    assert_eq!(
        ev.take(),
        [
            r#"BLOCK_JOB_COMPLETED {"device":"j0","len":4194304,"offset":4194304,"speed":0,"type":"backup"}"#,
            "j0:concluded"
        ]
    );
    assert_eq!(d.log(), ["prepare", "commit", "clean"]);
    assert_eq!(job.status(), JobStatus::Concluded);
    assert_eq!(reg.query_jobs()[0]["status"], "concluded");
    assert_eq!(err(job.cancel(true).await), verb_error("j0", "concluded", "cancel"));
    assert_eq!(err(job.finalize().await), verb_error("j0", "concluded", "finalize"));
    assert_eq!(err(reg.create(opts("j0"), Fake::quick())), "Job ID 'j0' already in use");

    job.dismiss().await.unwrap();
    assert_eq!(ev.take(), ["j0:null"]);
    assert_eq!(reg.query_jobs(), json!([]));
    assert_eq!(err(job.dismiss().await), "Job not found");
}

/// QEMU: cancel of a running job: `aborting, BLOCK_JOB_CANCELLED (offset so far),
/// concluded, null`; with auto-dismiss=false it stays concluded with
/// `error: Operation canceled` in both queries.
#[tokio::test(start_paused = true)]
async fn cancel_running() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg { total: 4 << 20, chunk: 1 << 20, ..Cfg::default() });
    let mut o = manual("j0");
    o.speed = 65536;
    let job = start(&reg, o, d.clone()).await;
    settle().await;
    ev.take();
    assert_eq!(job.block_info().unwrap()["offset"], 1048576);
    assert_eq!(job.block_info().unwrap()["busy"], false, "sleeping on the rate limit");
    job.cancel(true).await.unwrap();
    job.wait_finished().await;
    assert_eq!(
        ev.take(),
        [
            "j0:aborting",
            r#"BLOCK_JOB_CANCELLED {"device":"j0","len":4194304,"offset":1048576,"speed":65536,"type":"backup"}"#,
            "j0:concluded"
        ]
    );
    assert_eq!(d.log(), ["abort", "clean"]);
    assert_eq!(
        reg.query_jobs(),
        json!([{"current-progress": 1048576, "error": "Operation canceled", "id": "j0",
                "status": "concluded", "total-progress": 4194304, "type": "backup"}])
    );
    assert_eq!(reg.query_block_jobs()[0]["error"], "Operation canceled");
    job.dismiss().await.unwrap();
    assert_eq!(ev.take(), ["j0:null"]);
}

/// QEMU: block-job-cancel in PENDING: `aborting, BLOCK_JOB_CANCELLED, concluded`, all
/// before the reply; the job takes the abort path although its copy was complete.
#[tokio::test(start_paused = true)]
async fn cancel_in_pending() {
    let (reg, ev) = registry();
    let d = Fake::quick();
    let job = start(&reg, manual("j0"), d.clone()).await;
    job.wait_status(JobStatus::Pending).await;
    ev.take();
    job.block_job_cancel(false).await.unwrap();
    assert_eq!(
        ev.take(),
        [
            "j0:aborting",
            r#"BLOCK_JOB_CANCELLED {"device":"j0","len":65536,"offset":65536,"speed":0,"type":"backup"}"#,
            "j0:concluded"
        ]
    );
    assert_eq!(d.log(), ["abort", "clean"]);
    assert_eq!(reg.query_jobs()[0]["error"], "Operation canceled");
}

/// A job cancelled before it starts ends without a CANCELLED event (QEMU emits the
/// completion events only for started jobs).
#[tokio::test(start_paused = true)]
async fn cancel_created() {
    let (reg, ev) = registry();
    let d = Fake::quick();
    let job = reg.create(opts("j0"), d.clone()).unwrap();
    job.cancel(true).await.unwrap();
    assert_eq!(ev.take(), ["j0:created", "j0:aborting", "j0:concluded", "j0:null"]);
    assert_eq!(d.log(), ["abort", "clean"]);
}

/// QEMU, on-source-error=report and a read error: `BLOCK_JOB_ERROR {action: report}`,
/// `aborting`, `BLOCK_JOB_COMPLETED {error: Input/output error}`, `concluded`, `null`.
#[tokio::test(start_paused = true)]
async fn error_report() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg {
        total: 4 << 20,
        chunk: 1 << 20,
        fail: Some((1 << 20, IoOperation::Read, 5)),
        ..Cfg::default()
    });
    let job = start(&reg, opts("j0"), d.clone()).await;
    job.wait_finished().await;
    assert_eq!(
        ev.take(),
        seq(
            &START,
            &[
                r#"BLOCK_JOB_ERROR {"action":"report","device":"j0","operation":"read"}"#,
                "j0:aborting",
                r#"BLOCK_JOB_COMPLETED {"device":"j0","error":"Input/output error","len":4194304,"offset":1048576,"speed":0,"type":"backup"}"#,
                "j0:concluded",
                "j0:null",
            ]
        )
    );
    assert_eq!(d.log(), ["abort", "clean"]);
}

/// A failed job with auto-finalize=false does not wait in PENDING; with
/// auto-dismiss=false it stays concluded with the error in the queries (QEMU).
#[tokio::test(start_paused = true)]
async fn error_report_manual() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg { fail: Some((0, IoOperation::Write, 5)), ..Cfg::default() });
    let d = Fake::new(Cfg { total: 65536, chunk: 65536, ..d.0.cfg.clone() });
    let job = start(&reg, manual("j0"), d).await;
    job.wait_finished().await;
    let events = ev.take();
    assert_eq!(
        events[4],
        r#"BLOCK_JOB_ERROR {"action":"report","device":"j0","operation":"write"}"#
    );
    assert_eq!(
        &events[5..],
        [
            "j0:aborting",
            r#"BLOCK_JOB_COMPLETED {"device":"j0","error":"Input/output error","len":65536,"offset":0,"speed":0,"type":"backup"}"#,
            "j0:concluded"
        ]
    );
    assert_eq!(reg.query_jobs()[0]["error"], "Input/output error");
    assert_eq!(reg.query_block_jobs()[0]["error"], "Input/output error");
    assert_eq!(err(job.finalize().await), verb_error("j0", "concluded", "finalize"));
}

/// QEMU, on-source-error=ignore: `BLOCK_JOB_ERROR {action: ignore}` and the job goes on
/// to succeed.
#[tokio::test(start_paused = true)]
async fn error_ignore() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg {
        total: 2 << 20,
        chunk: 1 << 20,
        fail: Some((0, IoOperation::Read, 5)),
        ..Cfg::default()
    });
    let mut o = opts("j0");
    o.on_source_error = OnError::Ignore;
    let job = start(&reg, o, d).await;
    job.wait_finished().await;
    let events = ev.take();
    assert_eq!(
        &events[4..],
        [
            r#"BLOCK_JOB_ERROR {"action":"ignore","device":"j0","operation":"read"}"#,
            "j0:waiting",
            "j0:pending",
            r#"BLOCK_JOB_COMPLETED {"device":"j0","len":2097152,"offset":2097152,"speed":0,"type":"backup"}"#,
            "j0:concluded",
            "j0:null"
        ]
    );
}

/// QEMU, on-source-error=stop: `BLOCK_JOB_ERROR {action: stop}`, `paused`; the job is
/// user-paused (`paused: true`, io-status `failed`, or `nospace` for ENOSPC under
/// `enospc`), block-job-cancel without force is refused, and job-resume (io-status back
/// to `ok`) retries and succeeds.
#[tokio::test(start_paused = true)]
async fn error_stop_and_enospc() {
    for (policy, errno, io_status) in [
        (OnError::Stop, 5, "failed"),
        (OnError::Enospc, 28, "nospace"),
        (OnError::Auto, 28, "nospace"),
    ] {
        let (reg, ev) = registry();
        let d = Fake::new(Cfg {
            total: 2 << 20,
            chunk: 1 << 20,
            fail: Some((0, IoOperation::Read, errno)),
            ..Cfg::default()
        });
        let mut o = opts("j0");
        o.on_source_error = policy;
        let job = start(&reg, o, d).await;
        job.wait_status(JobStatus::Paused).await;
        assert_eq!(
            &ev.take()[4..],
            [r#"BLOCK_JOB_ERROR {"action":"stop","device":"j0","operation":"read"}"#, "j0:paused"]
        );
        let info = job.block_info().unwrap();
        assert_eq!(info["io-status"], io_status);
        assert_eq!(info["paused"], true);
        assert_eq!(info["status"], "paused");
        assert_eq!(info["offset"], 0);
        assert_eq!(
            err(job.block_job_cancel(false).await),
            "The block job for device 'j0' is currently paused"
        );
        assert_eq!(err(job.pause().await), "Job is already paused");
        job.resume().await.unwrap();
        assert_eq!(ev.take(), ["j0:running"], "running before the reply");
        assert_eq!(job.block_info().unwrap()["io-status"], "ok");
        job.wait_finished().await;
        assert_eq!(ev.take().last().unwrap(), "j0:null");
    }
}

/// enospc/auto report errors other than ENOSPC (QEMU: EIO under enospc → report).
#[tokio::test(start_paused = true)]
async fn error_enospc_policy_reports_eio() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg {
        total: 65536,
        chunk: 65536,
        fail: Some((0, IoOperation::Read, 5)),
        ..Cfg::default()
    });
    let mut o = opts("j0");
    o.on_source_error = OnError::Enospc;
    let job = start(&reg, o, d).await;
    job.wait_finished().await;
    assert_eq!(
        ev.take()[4],
        r#"BLOCK_JOB_ERROR {"action":"report","device":"j0","operation":"read"}"#
    );
}

/// Write errors follow on-target-error, not on-source-error.
#[tokio::test(start_paused = true)]
async fn write_errors_follow_target_policy() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg {
        total: 65536,
        chunk: 65536,
        fail: Some((0, IoOperation::Write, 5)),
        ..Cfg::default()
    });
    let mut o = opts("j0");
    o.on_source_error = OnError::Stop;
    o.on_target_error = OnError::Ignore;
    let job = start(&reg, o, d).await;
    job.wait_finished().await;
    assert_eq!(
        ev.take()[4],
        r#"BLOCK_JOB_ERROR {"action":"ignore","device":"j0","operation":"write"}"#
    );
}

// ---------------------------------------------------------------------------------
// Pause, resume, cancel of paused jobs

/// QEMU: job-pause of a job sleeping on its rate limit shows `paused` before the reply;
/// a second pause: `Job is already paused`; set-speed is allowed while paused; resume:
/// `running`; a second resume: `Can't resume a job that was not paused`.
#[tokio::test(start_paused = true)]
async fn pause_resume() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg { total: 4 << 20, chunk: 1 << 20, ..Cfg::default() });
    let mut o = opts("j0");
    o.speed = 65536;
    let job = start(&reg, o, d).await;
    settle().await;
    ev.take();
    assert_eq!(err(job.resume().await), "Can't resume a job that was not paused");
    job.pause().await.unwrap();
    assert_eq!(ev.take(), ["j0:paused"]);
    assert_eq!(err(job.pause().await), "Job is already paused");
    let info = job.block_info().unwrap();
    assert_eq!((info["paused"].clone(), info["status"].clone()), (json!(true), json!("paused")));
    assert_eq!(reg.query_jobs()[0]["status"], "paused");
    job.set_speed(1 << 20).await.unwrap();
    assert_eq!(job.block_info().unwrap()["speed"], 1048576);
    assert_eq!(err(job.set_speed(-1).await), "Parameter 'speed' expects a non-negative value");
    // A paused job makes no progress, however long it stays paused.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(job.block_info().unwrap()["offset"], 1048576);
    job.resume().await.unwrap();
    assert_eq!(ev.take(), ["j0:running"]);
    assert_eq!(err(job.resume().await), "Can't resume a job that was not paused");
    job.wait_finished().await;
}

/// A pause of a busy job takes effect at its next pause point (QEMU: job-pause returns
/// without an event, `paused: true` with status `running` meanwhile).
#[tokio::test(start_paused = true)]
async fn pause_of_busy_job_waits_for_pause_point() {
    struct Busy(watch::Sender<bool>);
    impl JobDriver for Busy {
        async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
            // Busy: awaits outside the context's waits.
            let mut rx = self.0.subscribe();
            let _ = rx.wait_for(|v| *v).await;
            ctx.pause_point().await;
            Ok(())
        }
    }
    let (reg, ev) = registry();
    let gate = watch::channel(false).0;
    let job = reg.create(opts("j0"), Busy(gate.clone())).unwrap();
    job.start().unwrap();
    settle().await;
    job.pause().await.unwrap();
    assert_eq!(ev.take(), ["j0:created", "j0:running"]);
    let info = job.block_info().unwrap();
    assert_eq!((info["paused"].clone(), info["status"].clone()), (json!(true), json!("running")));
    assert_eq!(info["busy"], true);
    gate.send_replace(true);
    job.wait_status(JobStatus::Paused).await;
    assert_eq!(ev.take(), ["j0:paused"]);
    job.resume().await.unwrap();
    job.wait_finished().await;
}

/// QEMU: job-cancel of a user-paused job wakes it (`running`) and cancels it;
/// block-job-cancel needs force.
#[tokio::test(start_paused = true)]
async fn cancel_paused() {
    let (reg, ev) = registry();
    let d = Fake::gated();
    let job = start(&reg, opts("j0"), d).await;
    settle().await;
    job.pause().await.unwrap();
    ev.take();
    assert_eq!(
        err(job.block_job_cancel(false).await),
        "The block job for device 'j0' is currently paused"
    );
    job.block_job_cancel(true).await.unwrap();
    job.wait_finished().await;
    assert_eq!(
        ev.take(),
        [
            "j0:running",
            "j0:aborting",
            r#"BLOCK_JOB_CANCELLED {"device":"j0","len":65536,"offset":0,"speed":0,"type":"backup"}"#,
            "j0:concluded",
            "j0:null"
        ]
    );
}

/// A job paused by a drain is woken by a cancel too (it does not pause again).
#[tokio::test(start_paused = true)]
async fn cancel_drained() {
    let (reg, ev) = registry();
    let job = start(&reg, opts("j0"), Fake::gated()).await;
    settle().await;
    let drain = reg.drain_all().await;
    assert_eq!(ev.take().last().unwrap(), "j0:paused");
    assert_eq!(job.block_info().unwrap()["paused"], true);
    // A drain is not a user pause.
    assert_eq!(err(job.resume().await), "Can't resume a job that was not paused");
    job.cancel(true).await.unwrap();
    job.wait_finished().await;
    assert_eq!(ev.take()[..2], ["j0:running", "j0:aborting"]);
    drop(drain);
}

/// job-pause while created: the job pauses as soon as it starts.
#[tokio::test(start_paused = true)]
async fn pause_while_created() {
    let (reg, ev) = registry();
    let d = Fake::quick();
    let job = reg.create(opts("j0"), d).unwrap();
    job.pause().await.unwrap();
    assert_eq!(job.block_info().unwrap()["paused"], true);
    job.start().unwrap();
    assert_eq!(ev.take(), ["j0:created", "j0:running", "j0:paused"]);
    settle().await;
    assert_eq!(job.status(), JobStatus::Paused);
    job.resume().await.unwrap();
    job.wait_finished().await;
    assert_eq!(ev.take()[0], "j0:running");
}

/// A drain waits for a busy job to reach its pause point.
#[tokio::test(start_paused = true)]
async fn drain_waits_for_quiescence() {
    struct Spin;
    impl JobDriver for Spin {
        async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
            for _ in 0..1000 {
                // Busy work between pause points.
                tokio::task::yield_now().await;
                ctx.pause_point().await;
                if ctx.is_cancelled() {
                    break;
                }
            }
            Ok(())
        }
    }
    let (reg, _ev) = registry();
    let job = reg.create(opts("j0"), Spin).unwrap();
    job.start().unwrap();
    let drain = job.drain().await;
    assert_eq!(job.status(), JobStatus::Paused);
    assert_eq!(job.block_info().unwrap()["busy"], false);
    drop(drain);
    job.wait_finished().await;
}

// ---------------------------------------------------------------------------------
// Every verb in every state a job stays in

#[tokio::test(start_paused = true)]
async fn verbs_by_state() {
    let verbs = ["pause", "resume", "set-speed", "complete", "finalize", "dismiss"];
    async fn apply(job: &Job, verb: &str) -> Result<(), JobError> {
        match verb {
            "pause" => job.pause().await,
            "resume" => job.resume().await,
            "set-speed" => job.set_speed(0).await,
            "complete" => job.complete().await,
            "finalize" => job.finalize().await,
            "dismiss" => job.dismiss().await,
            _ => unreachable!(),
        }
    }
    // Expected outcome per state: None = accepted, Some(text) = refused.
    let expect = |state: &str, verb: &str| -> Option<String> {
        let allowed = match verb {
            "pause" | "set-speed" => ["created", "running", "paused"].contains(&state),
            "resume" => {
                return (state != "paused")
                    .then(|| "Can't resume a job that was not paused".into());
            }
            "complete" => false,
            "finalize" => state == "pending",
            "dismiss" => state == "concluded",
            _ => unreachable!(),
        };
        if verb == "pause" && state == "paused" {
            return Some("Job is already paused".into());
        }
        if verb == "complete" && state == "ready" {
            return Some("The active block job 'j0' cannot be completed".into());
        }
        (!allowed).then(|| verb_error("j0", state, verb))
    };
    for state in ["created", "running", "paused", "waiting", "pending", "concluded"] {
        for verb in verbs {
            let (reg, _ev) = registry();
            let d = Fake::gated();
            let job = match state {
                "created" => reg.create(manual("j0"), d.clone()).unwrap(),
                "running" | "paused" => start(&reg, manual("j0"), d.clone()).await,
                "waiting" => {
                    // Done, while its grouped peer still runs.
                    let txn = reg.new_txn();
                    let mut a = manual("j0");
                    a.txn = Some(txn);
                    let mut b = manual("peer");
                    b.txn = Some(txn);
                    let jobs = start_all(&reg, vec![(a, d.clone()), (b, Fake::gated())]).await;
                    d.open();
                    jobs[0].wait_status(JobStatus::Waiting).await;
                    jobs[0].clone()
                }
                _ => {
                    let job = start(&reg, manual("j0"), d.clone()).await;
                    d.open();
                    job.wait_status(JobStatus::Pending).await;
                    if state == "concluded" {
                        job.finalize().await.unwrap();
                    }
                    job
                }
            };
            settle().await;
            if state == "paused" {
                job.pause().await.unwrap();
            }
            assert_eq!(job.status().as_str(), state);
            let got = apply(&job, verb).await.err().map(|e| e.to_string());
            assert_eq!(got, expect(state, verb), "{verb} in {state}");
        }
    }
    // cancel: accepted in every state above but concluded.
    for state in ["created", "running", "paused", "waiting", "pending"] {
        let (reg, _ev) = registry();
        let d = Fake::gated();
        let job = match state {
            "created" => reg.create(manual("j0"), d.clone()).unwrap(),
            _ => start(&reg, manual("j0"), d.clone()).await,
        };
        if state == "paused" {
            job.pause().await.unwrap();
        }
        if state == "waiting" || state == "pending" {
            d.open();
            job.wait_status(JobStatus::Pending).await;
        }
        job.cancel(true).await.unwrap();
        job.wait_finished().await;
        assert_eq!(job.result().unwrap().unwrap_err().message(), "Operation canceled", "{state}");
    }
}

// ---------------------------------------------------------------------------------
// Transactions

/// QEMU (grouped; `ok` created first and rate-limited, `fail` second with a read error):
/// `BLOCK_JOB_ERROR`, `aborting fail`, `aborting ok`, then newest first:
/// `BLOCK_JOB_COMPLETED fail {error}`, `concluded, null`, `BLOCK_JOB_CANCELLED ok`,
/// `concluded, null`. Both abort.
#[tokio::test(start_paused = true)]
async fn grouped_one_fails() {
    let (reg, ev) = registry();
    let txn = reg.new_txn();
    let ok = Fake::new(Cfg { total: 4 << 20, chunk: 1 << 20, ..Cfg::default() });
    let fail = Fake::new(Cfg {
        total: 4 << 20,
        chunk: 1 << 20,
        fail: Some((1 << 20, IoOperation::Read, 5)),
        ..Cfg::default()
    });
    let mut a = opts("ok");
    a.txn = Some(txn);
    a.speed = 1 << 20;
    let mut b = opts("fail");
    b.txn = Some(txn);
    let jobs = start_all(&reg, vec![(a, ok.clone()), (b, fail.clone())]).await;
    for j in &jobs {
        j.wait_finished().await;
    }
    assert_eq!(
        ev.take(),
        [
            "ok:created",
            "fail:created",
            "fail:running",
            "fail:paused",
            "ok:running",
            "ok:paused",
            "fail:running",
            "ok:running",
            r#"BLOCK_JOB_ERROR {"action":"report","device":"fail","operation":"read"}"#,
            "fail:aborting",
            "ok:aborting",
            r#"BLOCK_JOB_COMPLETED {"device":"fail","error":"Input/output error","len":4194304,"offset":1048576,"speed":0,"type":"backup"}"#,
            "fail:concluded",
            "fail:null",
            r#"BLOCK_JOB_CANCELLED {"device":"ok","len":4194304,"offset":1048576,"speed":1048576,"type":"backup"}"#,
            "ok:concluded",
            "ok:null",
        ]
    );
    assert_eq!(ok.log(), ["abort", "clean"]);
    assert_eq!(fail.log(), ["abort", "clean"]);
}

/// QEMU (grouped; `fail` created first): the finalize order is still newest first, so
/// `ok`'s CANCELLED comes before `fail`'s COMPLETED.
#[tokio::test(start_paused = true)]
async fn grouped_first_created_fails() {
    let (reg, ev) = registry();
    let txn = reg.new_txn();
    let mut a = opts("fail");
    a.txn = Some(txn);
    let mut b = opts("ok");
    b.txn = Some(txn);
    b.speed = 1 << 20;
    let fail = Fake::new(Cfg {
        total: 4 << 20,
        chunk: 1 << 20,
        fail: Some((1 << 20, IoOperation::Read, 5)),
        ..Cfg::default()
    });
    let ok = Fake::new(Cfg { total: 4 << 20, chunk: 1 << 20, ..Cfg::default() });
    let jobs = start_all(&reg, vec![(a, fail), (b, ok)]).await;
    for j in &jobs {
        j.wait_finished().await;
    }
    let events: Vec<String> = ev.take().into_iter().skip(8).collect();
    let names: Vec<&str> = events.iter().map(|e| e.split(' ').next().unwrap()).collect();
    assert_eq!(
        names,
        [
            "BLOCK_JOB_ERROR",
            "fail:aborting",
            "ok:aborting",
            "BLOCK_JOB_CANCELLED",
            "ok:concluded",
            "ok:null",
            "BLOCK_JOB_COMPLETED",
            "fail:concluded",
            "fail:null"
        ]
    );
}

/// QEMU (grouped, `a` auto-finalize=false, `b` auto: both finish): `waiting a, waiting
/// b, pending b, pending a, BLOCK_JOB_PENDING a`; job-finalize of `b` finalizes both,
/// newest first.
#[tokio::test(start_paused = true)]
async fn grouped_success_manual_finalize() {
    let (reg, ev) = registry();
    let txn = reg.new_txn();
    let mut a = manual("a");
    a.txn = Some(txn);
    let mut b = opts("b");
    b.txn = Some(txn);
    b.auto_dismiss = false;
    b.speed = 1 << 20;
    let (da, db) =
        (Fake::quick(), Fake::new(Cfg { total: 1 << 20, chunk: 1 << 20, ..Cfg::default() }));
    let jobs = start_all(&reg, vec![(a, da.clone()), (b, db.clone())]).await;
    jobs[0].wait_status(JobStatus::Pending).await;
    let events = ev.take();
    assert_eq!(
        &events[8..],
        [
            "a:waiting",
            "b:waiting",
            "b:pending",
            "a:pending",
            r#"BLOCK_JOB_PENDING {"id":"a","type":"backup"}"#
        ]
    );
    assert_eq!(reg.query_jobs()[0]["id"], "b", "newest first");
    jobs[1].finalize().await.unwrap();
    assert_eq!(
        ev.take(),
        [
            r#"BLOCK_JOB_COMPLETED {"device":"b","len":1048576,"offset":1048576,"speed":1048576,"type":"backup"}"#,
            "b:concluded",
            r#"BLOCK_JOB_COMPLETED {"device":"a","len":65536,"offset":65536,"speed":0,"type":"backup"}"#,
            "a:concluded",
        ]
    );
    assert_eq!(da.log(), ["prepare", "commit", "clean"]);
    assert_eq!(db.log(), ["prepare", "commit", "clean"]);
}

/// QEMU (grouped, `a` done and WAITING, `b` cancelled while running): `aborting b,
/// CANCELLED b, concluded b, null b`, then `aborting a, CANCELLED a, concluded a, null a`.
#[tokio::test(start_paused = true)]
async fn grouped_cancel_with_waiting_peer() {
    let (reg, ev) = registry();
    let txn = reg.new_txn();
    let mut a = opts("a");
    a.txn = Some(txn);
    a.auto_finalize = false;
    let mut b = opts("b");
    b.txn = Some(txn);
    let (da, db) = (Fake::quick(), Fake::gated());
    let jobs = start_all(&reg, vec![(a, da.clone()), (b, db)]).await;
    jobs[0].wait_status(JobStatus::Waiting).await;
    ev.take();
    jobs[1].cancel(true).await.unwrap();
    jobs[0].wait_finished().await;
    jobs[1].wait_finished().await;
    assert_eq!(
        ev.take(),
        [
            "b:aborting",
            r#"BLOCK_JOB_CANCELLED {"device":"b","len":65536,"offset":0,"speed":0,"type":"backup"}"#,
            "b:concluded",
            "b:null",
            "a:aborting",
            r#"BLOCK_JOB_CANCELLED {"device":"a","len":65536,"offset":65536,"speed":0,"type":"backup"}"#,
            "a:concluded",
            "a:null",
        ]
    );
    assert_eq!(da.log(), ["abort", "clean"], "a succeeded but its transaction aborted");
}

/// Individual transactions (no `JobTxn`): one job failing does not touch the other.
#[tokio::test(start_paused = true)]
async fn individual_jobs_are_independent() {
    let (reg, _ev) = registry();
    let fail = Fake::new(Cfg {
        total: 65536,
        chunk: 65536,
        fail: Some((0, IoOperation::Read, 5)),
        ..Cfg::default()
    });
    let ok = Fake::new(Cfg { total: 1 << 20, chunk: 65536, ..Cfg::default() });
    let mut o = opts("ok");
    o.speed = 1 << 20;
    let jobs = start_all(&reg, vec![(o, ok.clone()), (opts("fail"), fail.clone())]).await;
    for j in &jobs {
        j.wait_finished().await;
    }
    assert_eq!(ok.log(), ["prepare", "commit", "clean"]);
    assert_eq!(fail.log(), ["abort", "clean"]);
}

/// A failing prepare aborts the transaction (nobody commits).
#[tokio::test(start_paused = true)]
async fn prepare_failure_aborts() {
    let (reg, ev) = registry();
    let txn = reg.new_txn();
    let mut a = opts("a");
    a.txn = Some(txn);
    let mut b = opts("b");
    b.txn = Some(txn);
    let da = Fake::quick();
    let db = Fake::new(Cfg { total: 65536, chunk: 65536, fail_prepare: true, ..Cfg::default() });
    let jobs = start_all(&reg, vec![(a, da.clone()), (b, db.clone())]).await;
    for j in &jobs {
        j.wait_finished().await;
    }
    assert_eq!(db.log(), ["prepare", "abort", "clean"]);
    assert_eq!(da.log(), ["abort", "clean"]);
    let events = ev.take();
    assert!(events.contains(&r#"BLOCK_JOB_COMPLETED {"device":"b","error":"prepare failed","len":65536,"offset":65536,"speed":0,"type":"backup"}"#.to_string()), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("BLOCK_JOB_CANCELLED {\"device\":\"a\"")));
}

// ---------------------------------------------------------------------------------
// Rate limit

/// speed S, N bytes: the job takes N/S (1 MiB/s, 4 MiB in 64 KiB chunks: 4 s).
#[tokio::test(start_paused = true)]
async fn rate_limit_duration() {
    let (reg, _ev) = registry();
    let d = Fake::new(Cfg { total: 4 << 20, chunk: 64 << 10, ..Cfg::default() });
    let mut o = opts("j0");
    o.speed = 1 << 20;
    let t0 = Instant::now();
    let job = start(&reg, o, d).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let offset = job.block_info().unwrap()["offset"].as_u64().unwrap();
    assert!((1900 << 10..=2200 << 10).contains(&offset), "after 2 s: {offset}");
    job.wait_finished().await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(3900) && took <= Duration::from_millis(4100), "{took:?}");
}

/// block-job-set-speed while running: a faster speed applies at once, even to a job
/// sleeping on the old one (1 MiB at 1 MiB/s, then 3 MiB at 4 MiB/s: 1.75 s), and 0
/// lifts the limit.
#[tokio::test(start_paused = true)]
async fn set_speed_while_running() {
    let (reg, _ev) = registry();
    let d = Fake::new(Cfg { total: 4 << 20, chunk: 64 << 10, ..Cfg::default() });
    let mut o = opts("j0");
    o.speed = 1 << 20;
    let t0 = Instant::now();
    let job = start(&reg, o, d).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    job.set_speed(4 << 20).await.unwrap();
    assert_eq!(job.block_info().unwrap()["speed"], 4194304);
    job.wait_finished().await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1650) && took <= Duration::from_millis(1850), "{took:?}");

    // One big chunk at 64 KiB/s would sleep 16 s; set-speed 0 wakes it at once.
    let d = Fake::new(Cfg { total: 2 << 20, chunk: 1 << 20, ..Cfg::default() });
    let mut o = opts("j1");
    o.speed = 65536;
    let t0 = Instant::now();
    let job = start(&reg, o, d).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    job.set_speed(0).await.unwrap();
    job.wait_finished().await;
    assert!(t0.elapsed() < Duration::from_millis(1100), "{:?}", t0.elapsed());
}

/// A slower speed does not wake the job; the next delay uses it.
#[tokio::test(start_paused = true)]
async fn set_speed_slower() {
    let (reg, _ev) = registry();
    let d = Fake::new(Cfg { total: 2 << 20, chunk: 64 << 10, ..Cfg::default() });
    let mut o = opts("j0");
    o.speed = 2 << 20;
    let t0 = Instant::now();
    let job = start(&reg, o, d).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    job.set_speed(1 << 20).await.unwrap();
    job.wait_finished().await;
    // 1 MiB in 0.5 s, then 1 MiB at 1 MiB/s (the slice accounting spans the change).
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1400) && took <= Duration::from_millis(2600), "{took:?}");
}

// ---------------------------------------------------------------------------------
// Registry

#[tokio::test(start_paused = true)]
async fn ids_and_lookups() {
    let (reg, ev) = registry();
    for bad in ["", "1x", "#x", "a b", "é"] {
        assert_eq!(err(reg.create(opts(bad), Fake::quick())), format!("Invalid job ID '{bad}'"));
    }
    reg.check_new_id("a-b.c_D9").unwrap();
    let job = reg.create(manual("a-b.c_D9"), Fake::quick()).unwrap();
    assert_eq!(
        err(reg.create(opts("a-b.c_D9"), Fake::quick())),
        "Job ID 'a-b.c_D9' already in use"
    );
    assert_eq!(err(reg.check_new_id("a-b.c_D9")), "Job ID 'a-b.c_D9' already in use");
    assert_eq!(reg.job("a-b.c_D9").unwrap().id(), job.id());
    let e = reg.job("nosuch").unwrap_err();
    assert_eq!((e.class(), e.to_string().as_str()), ("GenericError", "Job not found"));
    let e = reg.block_job("nosuch").unwrap_err();
    assert_eq!(
        (e.class(), e.to_string().as_str()),
        ("DeviceNotActive", "Block job 'nosuch' not found")
    );
    ev.take();
    // QEMU: blockdev-backup with speed -1 emits created, null, then the error.
    let mut o = opts("neg");
    o.speed = -1;
    assert_eq!(err(reg.create(o, Fake::quick())), "Parameter 'speed' expects a non-negative value");
    assert_eq!(ev.take(), ["neg:created", "neg:null"]);
    assert!(reg.job("neg").is_err());
}

#[tokio::test(start_paused = true)]
async fn jobs_using_node_and_cancel_all() {
    let (reg, _ev) = registry();
    let mut o = opts("a");
    o.nodes = vec!["src".into(), "tgt".into()];
    let a = start(&reg, o, Fake::gated()).await;
    let mut o = opts("b");
    o.nodes = vec!["other".into()];
    let _b = start(&reg, o, Fake::gated()).await;
    let using: Vec<String> = reg.jobs_using_node("tgt").iter().map(|j| j.id().to_owned()).collect();
    assert_eq!(using, ["a"]);
    assert_eq!(reg.jobs().len(), 2);
    reg.cancel_all().await;
    assert!(reg.jobs().is_empty());
    assert_eq!(a.result(), None, "gone");
}

#[tokio::test(start_paused = true)]
async fn panicking_driver_fails_its_job() {
    let (reg, ev) = registry();
    let d = Fake::new(Cfg { total: 1, chunk: 1, panic: true, ..Cfg::default() });
    let job = start(&reg, manual("j0"), d).await;
    job.wait_finished().await;
    assert_eq!(job.result().unwrap().unwrap_err().message(), "Job panicked");
    assert!(ev.take().iter().any(|e| e.contains("\"error\":\"Job panicked\"")));
}

#[tokio::test(start_paused = true)]
async fn start_twice_and_outside_runtime() {
    let (reg, _ev) = registry();
    let job = reg.create(opts("j0"), Fake::quick()).unwrap();
    job.start().unwrap();
    assert_eq!(err(job.start()), "Job 'j0' has already been started");
    job.wait_finished().await;
    let job = reg.create(opts("j1"), Fake::quick()).unwrap();
    let e = std::thread::spawn(move || job.start().unwrap_err().to_string()).join().unwrap();
    assert_eq!(e, "Job 'j1' cannot start outside a tokio runtime");
}

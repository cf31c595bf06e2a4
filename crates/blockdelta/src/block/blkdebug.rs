//! The `blkdebug` driver: a pass-through node over one child (`image`) that fails
//! chosen requests, so that error paths (of backup jobs, exports, ...) can be tested as
//! QEMU's iotests do.
//!
//! The model is QEMU 10.0.2's, as observed through qemu-storage-daemon:
//!
//! - Rules are armed by *events*, not by requests. Events are emitted by the block
//!   layer and by the parent drivers on the way down: a write to a node emits `pwritev`
//!   (`pwritev_zero` for zeroes) before and `pwritev_done` after, on that node; a `raw`
//!   parent emits `read_aio`/`write_aio` on its child before passing a read or a write
//!   down; a flush emits `flush_to_os` and `flush_to_disk` on the flushed node's first
//!   child. An event goes to the first node down the first-child chain whose driver
//!   handles events (a blkdebug node). So `write_aio` never fires on a blkdebug node
//!   that is exported directly; it does under `driver=raw,file=<blkdebug>`.
//! - When an event fires, the `inject-error` rules for it whose `state` matches (0 =
//!   any) become the *active* rules, replacing the previous ones; if none matches, the
//!   active rules stay. Matching `set-state` rules change the state (the first one
//!   given wins), after all rules for the event have been looked at.
//! - Every request on the node (read, write, write-zeroes, discard, flush and block
//!   status) is checked against the active rules, first given first: a rule matches
//!   if its `iotype` covers the request (default: all but block status) and its
//!   `sector` is -1 or the request covers byte `sector * 512`. A matching rule fails the
//!   request with its errno without running it; a `once` rule is then deleted.
//! - `immediately` only changes, in QEMU, whether the failure is reported before or
//!   after a coroutine yield: either way the request is not run (verified: a failed
//!   write leaves the image unchanged with and without it). It is accepted and has no
//!   other effect here.
//! - `errno` 0 lets the request through; a negative `errno` completes it successfully
//!   without running it (QEMU returns the negated value, which callers take as
//!   success).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use super::node::{BlockDriver, BlockStatus, IoOrigin, Node, ZeroFlags};
use super::options::{OptionsError, OptionsReader, Syntax};

/// QEMU's `BlkdebugEvent` names, in QEMU's order.
pub const EVENT_NAMES: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// A blkdebug event (an index into [`EVENT_NAMES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DebugEvent(u8);

impl DebugEvent {
    /// A guest data read by a format driver (`raw` emits it on its child).
    pub const READ_AIO: DebugEvent = DebugEvent(9);
    /// A guest data write by a format driver.
    pub const WRITE_AIO: DebugEvent = DebugEvent(12);
    /// A flush: write back cached driver state.
    pub const FLUSH_TO_OS: DebugEvent = DebugEvent(33);
    /// A flush: flush the host's disk cache.
    pub const FLUSH_TO_DISK: DebugEvent = DebugEvent(34);
    /// A write reaches a node.
    pub const PWRITEV: DebugEvent = DebugEvent(39);
    /// A write of zeroes reaches a node.
    pub const PWRITEV_ZERO: DebugEvent = DebugEvent(40);
    /// A write to a node has finished (successfully or not).
    pub const PWRITEV_DONE: DebugEvent = DebugEvent(41);

    /// The event named `name` (QEMU's spelling).
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        EVENT_NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| u8::try_from(i).ok())
            .map(DebugEvent)
    }

    /// QEMU's name of the event.
    pub fn name(self) -> &'static str {
        EVENT_NAMES.get(usize::from(self.0)).copied().unwrap_or("none")
    }
}

/// The kinds of request a rule can fail (QEMU's `BlkdebugIOType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Writes of zeroes.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
    /// Block status queries.
    BlockStatus,
}

impl IoType {
    const NAMES: [(&'static str, IoType); 6] = [
        ("read", IoType::Read),
        ("write", IoType::Write),
        ("write-zeroes", IoType::WriteZeroes),
        ("discard", IoType::Discard),
        ("flush", IoType::Flush),
        ("block-status", IoType::BlockStatus),
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// Every kind but block status: a rule's default.
    const DEFAULT_MASK: u8 = 0b01_1111;
}

/// One `inject-error` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectError {
    /// The event that arms the rule.
    pub event: DebugEvent,
    /// The state the rule needs (0 = any).
    pub state: i64,
    /// The kinds of request it fails (bits of [`IoType`]).
    iotypes: u8,
    /// The errno to fail with (default EIO).
    pub errno: i64,
    /// The 512-byte sector whose first byte a request must cover (-1 = any).
    pub sector: i64,
    /// Deleted after it has failed one request.
    pub once: bool,
    /// QEMU's `immediately`; no effect here (see the module documentation).
    pub immediately: bool,
}

/// One `set-state` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetState {
    /// The event that triggers it.
    pub event: DebugEvent,
    /// The state it needs (0 = any).
    pub state: i64,
    /// The state it moves to.
    pub new_state: i64,
}

/// The options of a blkdebug node, but the child.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkdebugConfig {
    /// Error rules, in the order given.
    pub inject_error: Vec<InjectError>,
    /// State rules, in the order given.
    pub set_state: Vec<SetState>,
    /// `align`, checked against QEMU's rules; only 0 (the default) is supported.
    pub align: i64,
}

/// QEMU options blockdelta knows but does not implement: refused rather than ignored.
const UNSUPPORTED: &[&str] = &[
    "config",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
    "take-child-perms",
    "unshare-child-perms",
];

/// Reads the blkdebug options from `r` (after the common ones) in QEMU's order, and
/// returns them with the child's options (a node name or nested options).
pub(crate) fn parse_options(
    r: &mut OptionsReader,
) -> Result<(BlkdebugConfig, Value), OptionsError> {
    let image = r.take_value("image").ok_or_else(|| OptionsError::Missing(r.path("image")))?;
    let align = take_i64(r, "align")?;
    let syntax = r.syntax();
    let mut config = BlkdebugConfig::default();
    for (prefix, item) in list(r, "inject-error")? {
        let mut e = OptionsReader::new(item, &prefix, syntax)?;
        let event = take_event(&mut e)?;
        let state = take_i64(&mut e, "state")?.unwrap_or(0);
        let iotypes = match e.take_str("iotype")? {
            None => IoType::DEFAULT_MASK,
            Some(name) => match IoType::NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, t)) => t.bit(),
                None => return Err(OptionsError::BadValue { key: "iotype".into(), value: name }),
            },
        };
        let errno =
            take_i64(&mut e, "errno")?.unwrap_or(i64::from(rustix::io::Errno::IO.raw_os_error()));
        let sector = take_i64(&mut e, "sector")?.unwrap_or(-1);
        let once = e.take_bool("once")?.unwrap_or(false);
        let immediately = e.take_bool("immediately")?.unwrap_or(false);
        e.finish()?;
        config.inject_error.push(InjectError {
            event,
            state,
            iotypes,
            errno,
            sector,
            once,
            immediately,
        });
    }
    for (prefix, item) in list(r, "set-state")? {
        let mut s = OptionsReader::new(item, &prefix, syntax)?;
        let event = take_event(&mut s)?;
        let state = take_i64(&mut s, "state")?.unwrap_or(0);
        let new_state = take_i64(&mut s, "new_state")?
            .ok_or_else(|| OptionsError::Missing(s.path("new_state")))?;
        s.finish()?;
        config.set_state.push(SetState { event, state, new_state });
    }
    for key in UNSUPPORTED {
        if r.take_value(key).is_some() {
            return Err(OptionsError::Conflict(format!(
                "blkdebug option '{key}' is not supported by blockdelta"
            )));
        }
    }
    // Checked by QEMU when the driver opens, after the options were read.
    let align = align.unwrap_or(0);
    if align < 0 {
        return Err(OptionsError::Conflict(format!(
            "Value '{align}' is out of range for parameter 'align'"
        )));
    }
    config.align = align;
    Ok((config, image))
}

/// Checks `align` as QEMU does once the child is open; only the default is supported.
pub(crate) fn check_align(align: i64) -> Result<(), String> {
    if align != 0 && (align as u64).is_power_of_two() {
        return Err("blkdebug option 'align' is not supported by blockdelta".into());
    }
    if align != 0 {
        return Err(format!("Cannot meet constraints with align {align}"));
    }
    Ok(())
}

/// The event of a rule; an unknown name gets QEMU's text, which names the key alone.
fn take_event(r: &mut OptionsReader) -> Result<DebugEvent, OptionsError> {
    let name = r.require_str("event")?;
    DebugEvent::from_name(&name).ok_or(OptionsError::BadValue { key: "event".into(), value: name })
}

/// An optional signed integer (`int` in QAPI).
fn take_i64(r: &mut OptionsReader, key: &str) -> Result<Option<i64>, OptionsError> {
    let path = r.path(key);
    match (r.take_value(key), r.syntax()) {
        (None, _) => Ok(None),
        (Some(Value::Number(n)), Syntax::Json) => n
            .as_i64()
            .map(Some)
            .ok_or(OptionsError::InvalidType { key: path, expected: "integer".into() }),
        (Some(Value::String(s)), Syntax::Keyval) => s
            .parse()
            .map(Some)
            .map_err(|_| OptionsError::Expects { key: path, what: "integer".into() }),
        (Some(_), Syntax::Json) => {
            Err(OptionsError::InvalidType { key: path, expected: "integer".into() })
        }
        (Some(_), Syntax::Keyval) => {
            Err(OptionsError::Expects { key: path, what: "integer".into() })
        }
    }
}

/// The items of the list `key` with the dotted path of each (`key.0` in key=value
/// syntax, `key[0]` in JSON, as QEMU names them).
fn list(r: &mut OptionsReader, key: &str) -> Result<Vec<(String, Value)>, OptionsError> {
    let path = r.path(key);
    let items = match r.take_value(key) {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        // key=value lists with a gap in the indices stay objects.
        Some(Value::Object(map)) if r.syntax() == Syntax::Keyval => {
            let missing = (0..=map.len()).find(|i| !map.contains_key(&i.to_string())).unwrap_or(0);
            return Err(OptionsError::Syntax(format!("Parameter '{path}.{missing}' missing")));
        }
        Some(_) => return Err(OptionsError::InvalidType { key: path, expected: "array".into() }),
    };
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = match r.syntax() {
                Syntax::Keyval => format!("{path}.{i}"),
                Syntax::Json => format!("{path}[{i}]"),
            };
            (prefix, item)
        })
        .collect())
}

/// The rules' state, behind one lock: events and request checks are serialized.
#[derive(Debug)]
struct Engine {
    /// Error rules still alive (a fired `once` rule is deleted), in the order given.
    inject: Vec<(u64, InjectError)>,
    set_state: Vec<SetState>,
    /// Ids of the armed error rules, first given first.
    active: Vec<u64>,
    state: i64,
}

impl Engine {
    /// Checks a request of `bytes` at `offset` against the armed rules.
    fn check(&mut self, offset: u64, bytes: u64, io: IoType) -> Verdict {
        let Engine { inject, active, .. } = self;
        let hit = active.iter().position(|id| {
            inject.iter().find(|(i, _)| i == id).is_some_and(|(_, rule)| {
                let covers = rule.sector == -1
                    || u64::try_from(rule.sector)
                        .ok()
                        .and_then(|s| s.checked_mul(512))
                        .is_some_and(|byte| byte >= offset && byte - offset < bytes);
                rule.iotypes & io.bit() != 0 && covers
            })
        });
        let Some(pos) = hit else { return Verdict::Run };
        let id = active[pos];
        let Some(index) = inject.iter().position(|(i, _)| *i == id) else { return Verdict::Run };
        let rule = inject[index].1.clone();
        if rule.once {
            active.remove(pos);
            inject.remove(index);
        }
        match rule.errno {
            0 => Verdict::Run,
            e if e < 0 => Verdict::Skip,
            e => Verdict::Fail(io::Error::from_raw_os_error(i32::try_from(e).unwrap_or(i32::MAX))),
        }
    }

    /// An event from the block layer: arms the error rules it names (state
    /// permitting) and applies the first matching set-state rule.
    fn event(&mut self, event: DebugEvent) {
        let state = self.state;
        let applies = |rule_state: i64| rule_state == 0 || rule_state == state;
        let armed: Vec<u64> = self
            .inject
            .iter()
            .filter(|(_, r)| r.event == event && applies(r.state))
            .map(|(id, _)| *id)
            .collect();
        if !armed.is_empty() {
            self.active = armed;
        }
        // QEMU looks at the rules newest first, so the first given that matches wins.
        if let Some(rule) = self.set_state.iter().find(|r| r.event == event && applies(r.state)) {
            self.state = rule.new_state;
        }
    }
}

/// What a request does after the rules were checked.
enum Verdict {
    /// Run it.
    Run,
    /// Complete it successfully without running it (negative errno).
    Skip,
    /// Fail it.
    Fail(io::Error),
}

/// The blkdebug driver over its child node.
pub struct BlkdebugDriver {
    child: Arc<Node>,
    /// Shared with the storage view a qcow2 node above uses ([`BlockDriver::storage`]).
    engine: Arc<Mutex<Engine>>,
    /// The length seen at open and after resizes through this node: a resize of the
    /// child alone does not change it (QEMU 10.0.2 behaves so, verified with
    /// `block_resize` on the child and `query-named-block-nodes`).
    len: AtomicU64,
}

impl BlkdebugDriver {
    /// A blkdebug node over `child` with `config`'s rules; the state starts at 1.
    pub fn new(child: Arc<Node>, config: BlkdebugConfig) -> Self {
        let inject = (0u64..).zip(config.inject_error).collect();
        let engine = Engine { inject, set_state: config.set_state, active: Vec::new(), state: 1 };
        let len = AtomicU64::new(child.len());
        BlkdebugDriver { child, engine: Arc::new(Mutex::new(engine)), len }
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks a request of `bytes` at `offset` against the armed rules.
    fn check(&self, offset: u64, bytes: u64, io: IoType) -> Verdict {
        self.engine().check(offset, bytes, io)
    }

    /// Runs `f` unless an armed rule says otherwise.
    fn guarded(
        &self,
        offset: u64,
        bytes: u64,
        io: IoType,
        f: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        match self.check(offset, bytes, io) {
            Verdict::Run => f(),
            Verdict::Skip => Ok(()),
            Verdict::Fail(e) => Err(e),
        }
    }
}

impl BlockDriver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn filename(&self) -> Option<PathBuf> {
        self.child.filename()
    }

    fn debug_event(&self, event: DebugEvent) -> bool {
        self.engine().event(event);
        true
    }

    /// A filter: writes from a format node above may grow the file below, and then
    /// this node's length follows them (as QEMU updates a node's length after a write
    /// past its end).
    fn growable(&self) -> bool {
        self.child.growable()
    }

    fn check_resize(&self, _new_len: u64) -> io::Result<()> {
        // The child decides.
        Ok(())
    }

    fn resize(&self, new_len: u64) -> io::Result<()> {
        self.child.resize_blocking(new_len).map_err(io::Error::from)?;
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.guarded(offset, buf.len() as u64, IoType::Read, || {
            self.child.io(IoOrigin::Parent).read(buf, offset)
        })
    }

    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.guarded(offset, buf.len() as u64, IoType::Write, || {
            self.child.io(IoOrigin::Parent).write(buf, offset, fua)?;
            self.len.fetch_max(offset + buf.len() as u64, Ordering::AcqRel);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.guarded(offset, len, IoType::WriteZeroes, || {
            self.child.io(IoOrigin::Parent).write_zeroes(offset, len, flags)?;
            self.len.fetch_max(offset + len, Ordering::AcqRel);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guarded(offset, len, IoType::Discard, || {
            self.child.io(IoOrigin::Parent).discard(offset, len)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.guarded(0, 0, IoType::Flush, || self.child.io(IoOrigin::Parent).flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        match self.check(offset, len, IoType::BlockStatus) {
            Verdict::Fail(e) => Err(e),
            // A skipped query still needs an answer: the child's.
            Verdict::Run | Verdict::Skip => {
                self.child.io(IoOrigin::Parent).block_status(offset, len)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_round_trip() {
        for (i, name) in EVENT_NAMES.iter().enumerate() {
            let e = DebugEvent::from_name(name).unwrap();
            assert_eq!(usize::from(e.0), i);
            assert_eq!(e.name(), *name);
        }
        assert_eq!(DebugEvent::READ_AIO.name(), "read_aio");
        assert_eq!(DebugEvent::WRITE_AIO.name(), "write_aio");
        assert_eq!(DebugEvent::FLUSH_TO_OS.name(), "flush_to_os");
        assert_eq!(DebugEvent::FLUSH_TO_DISK.name(), "flush_to_disk");
        assert_eq!(DebugEvent::PWRITEV.name(), "pwritev");
        assert_eq!(DebugEvent::PWRITEV_ZERO.name(), "pwritev_zero");
        assert_eq!(DebugEvent::PWRITEV_DONE.name(), "pwritev_done");
        assert_eq!(DebugEvent::from_name("bogus"), None);
    }
}

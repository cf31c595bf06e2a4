//! Finding and running external programs.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long [`run`] lets a command run before killing it.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The Debian package that ships `tool` (a name or a path), for error messages.
fn package_of(tool: &str) -> Option<&'static str> {
    let name = tool.rsplit('/').next().unwrap_or(tool);
    match name {
        "qemu-img" | "qemu-io" | "qemu-nbd" | "qemu-storage-daemon" => Some("qemu-utils"),
        "qemu-system-x86_64" => Some("qemu-system-x86"),
        "nbdinfo" | "nbdcopy" => Some("libnbd-bin"),
        _ => None,
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The path of the program `name`: searched on `PATH`, or taken as is when it contains
/// a `/`. `None` if there is no such executable file.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return is_executable(&path).then_some(path);
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

/// The path of the program `name` (see [`find_tool`]).
///
/// # Panics
/// If the program is not found; the message names it and the Debian package that
/// ships it. Interop tests call this so that they fail, never skip, without the tool.
#[track_caller]
pub fn require_tool(name: &str) -> PathBuf {
    if let Some(path) = find_tool(name) {
        return path;
    }
    let install = match package_of(name) {
        Some(package) => {
            format!("install the Debian package `{package}` (apt-get install {package})")
        }
        None => "install the package that provides it".to_owned(),
    };
    panic!(
        "required tool `{name}` was not found on PATH; {install}. Interop tests fail rather \
         than skip when a tool is missing."
    )
}

/// `nbd+unix:///EXPORT?socket=SOCKET`: the URI with which QEMU's tools open an NBD export
/// served on a unix socket.
pub fn nbd_unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Runs `cmd` (stdin closed) with [`DEFAULT_RUN_TIMEOUT`]; see [`run_timeout`].
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    run_timeout(cmd, DEFAULT_RUN_TIMEOUT)
}

/// Runs `cmd` with stdin closed and returns its stdout (lossily decoded).
///
/// Fails, with the command line, its exit status, stderr and stdout in the error, if the
/// program cannot be started, exits non-zero or by a signal, or runs longer than
/// `timeout` (then it is killed).
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let line = command_line(cmd);
    // Files rather than pipes: nothing can block on a full pipe while we poll.
    let mut out = tempfile::tempfile().context("creating a temporary file for stdout")?;
    let mut err = tempfile::tempfile().context("creating a temporary file for stderr")?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // The child is ours and still unreaped, so its PID cannot have been reused.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = read_all(&mut out);
    let stderr = read_all(&mut err);
    match status {
        Some(status) if status.success() => Ok(stdout),
        Some(status) => {
            bail!("`{line}` failed ({status})\n--- stderr ---\n{stderr}--- stdout ---\n{stdout}")
        }
        None => bail!(
            "`{line}` timed out after {timeout:?} and was killed\n--- stderr ---\n{stderr}\
             --- stdout ---\n{stdout}"
        ),
    }
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    if file.rewind().is_ok() {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        line.push(' ');
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
            line.push_str(&format!("'{}'", arg.replace('\'', r"'\''")));
        } else {
            line.push_str(&arg);
        }
    }
    line
}

/// Runs `qemu-img ARGS` (see [`run`]); panics if `qemu-img` is missing.
pub fn qemu_img<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(require_tool("qemu-img")).args(args))
}

/// Creates a qcow2 image with `qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT]
/// PATH SIZE`; `opts` may be empty, `size` is anything `qemu-img` takes (`64M`, bytes).
pub fn create_qcow2(
    path: &std::path::Path,
    size: &str,
    opts: &str,
    backing: Option<(&std::path::Path, &str)>,
) -> anyhow::Result<String> {
    let mut args: Vec<OsString> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    if let Some((file, format)) = backing {
        args.extend(["-b".into(), file.into(), "-F".into(), format.into()]);
    }
    args.extend([path.into(), size.into()]);
    qemu_img(args)
}

/// Runs `qemu-io ARGS` (see [`run`]); panics if `qemu-io` is missing. `qemu-io` exits
/// non-zero when one of its `-c` commands fails, so a failed write is an error.
pub fn qemu_io<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(require_tool("qemu-io")).args(args))
}

//! Where a key file's passphrase comes from: `$BLOCKDELTA_PASSPHRASE` when it is set
//! (scripts, services), else the controlling terminal, asked with echo off, when
//! standard input is one (as restic and borg ask); never from a pipe, so that a
//! script without the variable fails with a clear error instead of hanging.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};

use rustix::termios::{self, LocalModes, OptionalActions, Termios};

/// The passphrase variable.
pub const PASSPHRASE_ENV: &str = "BLOCKDELTA_PASSPHRASE";

/// Longest passphrase read from the terminal (a longer line is refused).
const MAX_LEN: u64 = 1024;

/// How often a new passphrase is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Once: a passphrase that exists (to unseal a key file).
    Once,
    /// Twice, compared: a passphrase being chosen; empty means none.
    Confirmed,
}

/// The passphrase from the variable (set and not empty), else from the terminal when
/// standard input is one; `Ok(None)` when neither gives one (for [`Entry::Confirmed`],
/// also when the user typed an empty one: no passphrase).
pub fn passphrase(prompt: &str, entry: Entry) -> io::Result<Option<String>> {
    if let Some(p) = std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty()) {
        return Ok(Some(p));
    }
    if !termios::isatty(std::io::stdin()) {
        return Ok(None);
    }
    let tty = match OpenOptions::new().read(true).write(true).open("/dev/tty") {
        Ok(t) => t,
        // No controlling terminal after all (stdin is another terminal): nothing to ask.
        Err(_) => return Ok(None),
    };
    let first = read_hidden(&tty, prompt)?;
    if entry == Entry::Confirmed {
        if first.is_empty() {
            return Ok(None);
        }
        if read_hidden(&tty, "Again: ")? != first {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the passphrases differ"));
        }
    }
    Ok(Some(first))
}

/// Puts the terminal's settings back when dropped, whatever happened meanwhile.
struct EchoOff<'t> {
    tty: &'t File,
    saved: Termios,
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.tty, OptionalActions::Now, &self.saved);
    }
}

/// Writes `prompt` to the terminal and reads one line with echo off.
fn read_hidden(tty: &File, prompt: &str) -> io::Result<String> {
    let saved = termios::tcgetattr(tty)?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    quiet.local_modes.insert(LocalModes::ECHONL);
    termios::tcsetattr(tty, OptionalActions::Now, &quiet)?;
    let _restore = EchoOff { tty, saved };
    let mut out = tty;
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    let mut line = Vec::new();
    BufReader::new(tty.take(MAX_LEN + 1)).read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() as u64 > MAX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the passphrase is longer than {MAX_LEN} bytes"),
        ));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the passphrase is not UTF-8"))
}

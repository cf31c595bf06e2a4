//! Progress bars for the repository commands (indicatif): bytes, rate and ETA on
//! stderr, only when stderr is a terminal and neither `-q` nor `--json` was given.

use std::io::IsTerminal;
use std::sync::Mutex;

use blockdelta::repo::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// A [`Progress`] drawn as an indicatif bar, or nothing.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
    enabled: bool,
}

impl Bar {
    /// A bar shown only when stderr is a terminal and `quiet` is false.
    pub fn new(quiet: bool) -> Bar {
        Bar { bar: Mutex::new(None), enabled: !quiet && std::io::stderr().is_terminal() }
    }
}

impl Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        if !self.enabled {
            return;
        }
        let mut guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match &*guard {
            // A phase that grows its total as it learns more keeps its bar.
            Some(b) if b.message() == phase => b.set_length(total),
            _ => {
                let b = ProgressBar::new(total);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_message(phase.to_owned());
                *guard = Some(b);
            }
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

/// Bytes for people: `41.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

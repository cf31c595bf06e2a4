//! `scripts/apt-backports-source`, which `scripts/test` runs to get QEMU 10.0.2 from
//! bookworm-backports: run on scratch directories laid out as `/etc/apt`, in both
//! source formats. It must take the URI of the configured source for suite `bookworm`,
//! component `main`, add only the suite `bookworm-backports`, name no host of its own,
//! and leave a machine alone that has the suite already or has no such source. Where
//! `apt-get` is installed, its own parser reads the result (`--print-uris`: nothing is
//! downloaded).

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/apt-backports-source")
}

/// A scratch root with `files` (paths relative to `etc/apt`).
fn root(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc/apt/sources.list.d")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join("etc/apt").join(name), text).unwrap();
    }
    dir
}

fn dest(root: &Path) -> PathBuf {
    root.join("etc/apt/sources.list.d/bookworm-backports.sources")
}

/// Runs the script on `root`: (success, stderr).
fn run(root: &Path) -> (bool, String) {
    let out = Command::new("bash").arg(script()).arg(root).output().unwrap();
    assert!(out.stdout.is_empty(), "{out:?}");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The source the script writes for `uri` (and `signed_by`).
fn expected(uri: &str, signed_by: Option<&str>) -> String {
    let mut s = format!("Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n");
    if let Some(k) = signed_by {
        s.push_str(&format!("Signed-By: {k}\n"));
    }
    s
}

/// What `apt-get update --print-uris` would fetch for the sources under `root`.
fn apt_uris(root: &Path) -> Option<String> {
    let apt = which("apt-get")?;
    // apt-get wants its lock files, i.e. root.
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return None;
    }
    let lists = root.join("lists");
    std::fs::create_dir_all(lists.join("partial")).unwrap();
    let sources = root.join("etc/apt");
    let list = sources.join("sources.list");
    let out = Command::new(apt)
        .arg("-o")
        .arg(format!(
            "Dir::Etc::sourcelist={}",
            if list.exists() { list } else { "/dev/null".into() }.display()
        ))
        .arg("-o")
        .arg(format!("Dir::Etc::sourceparts={}", sources.join("sources.list.d").display()))
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", lists.display()))
        .args(["--print-uris", "update"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "apt-get: {text}");
    assert!(!text.contains("\nE:") && !text.starts_with("E:"), "apt-get: {text}");
    Some(text)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// The script writes `want` and apt would fetch bookworm-backports from `uri`.
fn assert_writes(files: &[(&str, &str)], uri: &str, signed_by: Option<&str>) {
    let dir = root(files);
    let (ok, err) = run(dir.path());
    assert!(ok, "{files:?}: {err}");
    let written = std::fs::read_to_string(dest(dir.path())).unwrap();
    assert_eq!(written, expected(uri, signed_by), "{files:?}");
    if let Some(uris) = apt_uris(dir.path()) {
        let release = format!("'{}/dists/bookworm-backports/InRelease'", uri.trim_end_matches('/'));
        assert!(uris.contains(&release), "{files:?}: apt would not fetch {release}: {uris}");
    }
    // Run again: the suite is there now, nothing changes.
    let (ok, err) = run(dir.path());
    assert!(ok && err.contains("already configured"), "{err}");
    assert_eq!(std::fs::read_to_string(dest(dir.path())).unwrap(), written);
}

/// The script refuses (`ok` false) or declines (`ok` true) and writes nothing.
fn assert_writes_nothing(files: &[(&str, &str)], ok: bool, says: &str) {
    let dir = root(files);
    let (success, err) = run(dir.path());
    assert_eq!(success, ok, "{files:?}: {err}");
    assert!(err.contains(says), "{files:?}: {err:?} should say {says:?}");
    assert!(!dest(dir.path()).exists(), "{files:?}");
    let mut left: Vec<_> = std::fs::read_dir(dir.path().join("etc/apt/sources.list.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    let mut want: Vec<String> = files
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("sources.list.d/").map(str::to_string))
        .collect();
    want.sort();
    assert_eq!(left, want, "no other file appears");
}

#[test]
fn the_script_names_no_host() {
    let text = std::fs::read_to_string(script()).unwrap();
    assert!(!text.contains("://"), "scripts/apt-backports-source names a URI");
    assert!(!text.contains("debian.org"), "scripts/apt-backports-source names a host");
    let test = std::fs::read_to_string(script().with_file_name("test")).unwrap();
    assert!(!test.contains("://"), "scripts/test names a URI");
    assert!(test.contains("scripts/apt-backports-source"), "scripts/test does not use it");
}

#[test]
fn deb822_sources() {
    // The layout of a Debian container image.
    let debian = "Types: deb\n# a comment\nURIs: http://mirror.example.invalid/debian\n\
                  Suites: bookworm bookworm-updates\nComponents: main\n\
                  Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                  Types: deb\nURIs: http://security.example.invalid/debian-security\n\
                  Suites: bookworm-security\nComponents: main\n\
                  Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
    assert_writes(
        &[("sources.list.d/debian.sources", debian)],
        "http://mirror.example.invalid/debian",
        Some("/usr/share/keyrings/debian-archive-keyring.gpg"),
    );
    // Field names in any case, several URIs (the first is taken), no Signed-By,
    // disabled and deb-src stanzas skipped, other extensions ignored.
    let mixed = "types: deb-src\nURIs: http://src.example.invalid/debian\nSuites: bookworm\n\
                 Components: main\n\n\
                 Types: deb\nEnabled: no\nURIs: http://off.example.invalid/debian\n\
                 Suites: bookworm\nComponents: main\n\n\
                 TYPES: deb deb-src\nuris: http://a.example.invalid/debian/ \
                 http://b.example.invalid/debian\nsuites: bookworm\ncomponents: contrib main\n";
    assert_writes(
        &[
            ("sources.list.d/mixed.sources", mixed),
            (
                "sources.list.d/zz.sources.disabled",
                "Types: deb\nURIs: http://no.example.invalid/\nSuites: bookworm\nComponents: main\n",
            ),
        ],
        "http://a.example.invalid/debian/",
        None,
    );
    // An inline key (a multi-line field) is carried over line by line.
    let key = "\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBGRsomekey\n \
               -----END PGP PUBLIC KEY BLOCK-----";
    let inline = format!(
        "Types: deb\nURIs: http://k.example.invalid/debian\nSuites: bookworm\n\
         Components: main\nSigned-By:{key}\n"
    );
    let dir = root(&[("sources.list.d/k.sources", &inline)]);
    let (ok, err) = run(dir.path());
    assert!(ok, "{err}");
    let written = std::fs::read_to_string(dest(dir.path())).unwrap();
    assert_eq!(
        written,
        format!(
            "Types: deb\nURIs: http://k.example.invalid/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: {key}\n"
        )
    );
}

#[test]
fn one_line_sources() {
    let list = "# deb http://commented.example.invalid/debian bookworm main\n\
                deb-src http://src.example.invalid/debian bookworm main\n\
                deb http://security.example.invalid/debian-security bookworm-security main\n\
                \tdeb   http://mirror.example.invalid/debian   bookworm main contrib # x\n";
    assert_writes(&[("sources.list", list)], "http://mirror.example.invalid/debian", None);
    // Options, and the signed-by among them.
    let list = "deb [arch=amd64 signed-by=/etc/apt/keyrings/d.gpg] \
                http://opt.example.invalid/debian bookworm main\n";
    assert_writes(
        &[("sources.list.d/d.list", list)],
        "http://opt.example.invalid/debian",
        Some("/etc/apt/keyrings/d.gpg"),
    );
    // sources.list first, then the directory by name, whatever the format; a bookworm
    // source without main does not count.
    assert_writes(
        &[
            ("sources.list", "deb http://contrib.example.invalid/debian bookworm contrib\n"),
            ("sources.list.d/b.list", "deb http://second.example.invalid/debian bookworm main\n"),
            (
                "sources.list.d/a.sources",
                "Types: deb\nURIs: http://first.example.invalid/debian\nSuites: bookworm\n\
                 Components: main\n",
            ),
        ],
        "http://first.example.invalid/debian",
        None,
    );
}

#[test]
fn nothing_is_written_when_the_suite_is_there_or_no_source_fits() {
    assert_writes_nothing(
        &[
            ("sources.list", "deb http://m.example.invalid/debian bookworm main\n"),
            (
                "sources.list.d/bp.list",
                "deb http://m.example.invalid/debian bookworm-backports main\n",
            ),
        ],
        true,
        "already configured",
    );
    assert_writes_nothing(
        &[(
            "sources.list.d/debian.sources",
            "Types: deb\nURIs: http://m.example.invalid/debian\n\
             Suites: bookworm bookworm-backports\nComponents: main\n",
        )],
        true,
        "already configured",
    );
    for files in [
        vec![],
        vec![("sources.list", "# nothing\n")],
        vec![(
            "sources.list.d/debian.sources",
            "Types: deb\nURIs: http://s.example.invalid/debian-security\n\
             Suites: bookworm-security\nComponents: main\n",
        )],
        vec![("sources.list", "deb http://t.example.invalid/debian trixie main\n")],
        vec![("sources.list", "deb-src http://t.example.invalid/debian bookworm main\n")],
        vec![(
            "sources.list.d/x.sources",
            "Types: deb\nEnabled: no\nURIs: http://m.example.invalid/debian\n\
             Suites: bookworm\nComponents: main\n",
        )],
        vec![(
            "sources.list.d/debian.sources.disabled-by-farm",
            "Types: deb\nURIs: http://m.example.invalid/debian\nSuites: bookworm\n\
             Components: main\n",
        )],
    ] {
        assert_writes_nothing(&files, false, "no Debian source for suite bookworm");
    }
}

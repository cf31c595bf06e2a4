//! `blockdelta key create`: key files, with and without a passphrase.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use repo::key::Keys;

fn key_create(file: &std::path::Path, passphrase: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blockdelta"));
    cmd.args(["key", "create"]).arg(file).args(["--kdf-memory", "8", "--kdf-iterations", "1"]);
    cmd.env_remove("BLOCKDELTA_PASSPHRASE");
    if let Some(p) = passphrase {
        cmd.env("BLOCKDELTA_PASSPHRASE", p);
    }
    cmd.output().unwrap()
}

#[test]
fn key_files_are_private_new_and_readable_with_their_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.key");
    let out = key_create(&plain, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777, 0o600);
    let keys = Keys::read_key_file(&plain, || None).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&keys.fingerprint()[..16]), "{stdout}");

    // An existing file is never replaced.
    let before = std::fs::read(&plain).unwrap();
    let again = key_create(&plain, None);
    assert!(!again.status.success());
    assert_eq!(std::fs::read(&plain).unwrap(), before);

    let sealed = dir.path().join("sealed.key");
    let out = key_create(&sealed, Some("correct horse"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&sealed).unwrap();
    assert!(text.contains("memory-kib"), "{text}");
    let k = Keys::read_key_file(&sealed, || Some("correct horse".into())).unwrap();
    assert!(Keys::read_key_file(&sealed, || Some("wrong".into())).is_err());
    let needs = Keys::read_key_file(&sealed, || None).unwrap_err().to_string();
    assert!(needs.contains("BLOCKDELTA_PASSPHRASE"), "{needs}");
    assert_ne!(k.fingerprint(), keys.fingerprint());

    let bad = Command::new(env!("CARGO_BIN_EXE_blockdelta"))
        .args(["key", "create"])
        .arg(dir.path().join("x.key"))
        .args(["--kdf-memory", "1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(!dir.path().join("x.key").exists(), "a refused command writes nothing");
}

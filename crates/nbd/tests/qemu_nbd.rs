//! The crate's client against QEMU's own server (`qemu-nbd`), with a dirty bitmap.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd::Extent;
use nbd::client::{Client, ClientOptions};
use nbd::proto::*;

/// Kills and reaps the `qemu-nbd` child (by its PID, through `Child`) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn client_reads_qemu_nbd_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    testkit::qemu_img(["create", "-f", "qcow2", img_s, "4M"]).unwrap();
    testkit::qemu_io(["-f", "qcow2", img_s, "-c", "write -P 0x11 0 128k"]).unwrap();
    testkit::qemu_img(["bitmap", "--add", "-g", "64k", img_s, "bm"]).unwrap();
    testkit::qemu_io(["-f", "qcow2", img_s, "-c", "write -P 0x22 1M 4k"]).unwrap();
    let sock = dir.path().join("qemu-nbd.sock");
    let child = Command::new(testkit::require_tool("qemu-nbd"))
        .args(["-r", "-t", "-B", "bm", "-A", "-f", "qcow2", "-x", "exp", "-k"])
        .arg(&sock)
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for extended in [false, true] {
        rt.block_on(async {
            let options = ClientOptions {
                export: "exp".into(),
                meta_contexts: vec![
                    "base:allocation".into(),
                    "qemu:dirty-bitmap:bm".into(),
                    "qemu:allocation-depth".into(),
                ],
                extended_headers: extended,
            };
            let mut c = Client::connect_unix(&sock, &options).await.unwrap();
            assert_eq!(c.extended(), extended);
            assert_ne!(c.flags() & FLAG_READ_ONLY, 0);
            let names: Vec<&str> = c.meta_contexts().iter().map(|(_, n)| n.as_str()).collect();
            assert_eq!(names.len(), 3, "{names:?}");
            let mut buf = vec![0u8; 8192];
            c.read((1 << 20) - 4096, &mut buf).await.unwrap();
            assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0x22));
            let status = c.block_status(0, 4 << 20, false).await.unwrap();
            for (id, extents) in status {
                let name = &c.meta_contexts().iter().find(|(i, _)| *i == id).unwrap().1;
                let total: u64 = extents.iter().map(|e| e.length).sum();
                assert_eq!(total, 4 << 20, "{name}: {extents:?}");
                if name == "qemu:dirty-bitmap:bm" {
                    assert_eq!(
                        extents,
                        [
                            Extent { length: 1 << 20, flags: 0 },
                            Extent { length: 65536, flags: 1 },
                            Extent { length: (3 << 20) - 65536, flags: 0 }
                        ]
                    );
                } else if name == "qemu:allocation-depth" {
                    assert_eq!(extents[0], Extent { length: 131072, flags: 1 }, "{extents:?}");
                }
            }
            c.disconnect().await.unwrap();
        });
    }
}

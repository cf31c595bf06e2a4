//! The event loop keeps serving while a long QMP command runs: NBD reads go on being
//! answered during `x-debug-block-dirty-bitmap-sha256` of a 1 TiB bitmap at 512 B
//! granularity (256 MiB to hash). When that command ran on the event-loop thread, no
//! read was answered until its reply.
//!
//! This asserts progress, not a time: the latency figure is `scripts/bench-latency`'s
//! (README). Fails, never skips, when a tool is missing (`scripts/test` installs them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use nbd::client::{Client, ClientOptions};
use testkit::qsd::StorageDaemon;
use testkit::serde_json::json;
use testkit::{create_qcow2, qemu_io};

#[test]
fn nbd_reads_are_answered_while_a_bitmap_of_a_1_tib_disk_is_hashed() {
    let daemon_dir = tempfile::tempdir().unwrap();
    let image = daemon_dir.path().join("big.qcow2");
    create_qcow2(&image, "1T", "", None).unwrap();
    qemu_io(["-f", "qcow2", "-c", "write -P 0x5a 0 16M", image.to_str().unwrap()]).unwrap();
    let socket = daemon_dir.path().join("nbd.sock");
    let mut daemon = StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta"))
        .arg("serve")
        .args(["--blockdev", &format!("driver=file,node-name=f0,filename={}", image.display())])
        .args(["--blockdev", "driver=qcow2,node-name=d0,file=f0"])
        .args(["--nbd-server", &format!("addr.type=unix,addr.path={}", socket.display())])
        .args(["--export", "type=nbd,id=e0,node-name=d0,name=d0"])
        .start()
        .unwrap();
    daemon.execute_ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "big", "granularity": 512}),
    );

    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (answered, stop, socket) = (answered.clone(), stop.clone(), socket.clone());
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let options = ClientOptions { export: "d0".into(), ..Default::default() };
                let mut client = Client::connect_unix(&socket, &options).await.unwrap();
                let mut buf = vec![0u8; 4096];
                let mut place = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    place = (place + 997) % 4096; // 4 KiB blocks of the written 16 MiB
                    client.read(place * 4096, &mut buf).await.unwrap();
                    assert!(buf.iter().all(|&b| b == 0x5a), "read at block {place}");
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
    };
    while answered.load(Ordering::Relaxed) < 100 {
        // The reader is connected and in its stride; a reader that failed says why.
        assert!(!reader.is_finished(), "the reader stopped before the command");
        thread::yield_now();
    }
    let before = answered.load(Ordering::Relaxed);
    let reply = daemon
        .execute_ok("x-debug-block-dirty-bitmap-sha256", json!({"node": "d0", "name": "big"}));
    let during = answered.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert_eq!(reply["sha256"].as_str().map(str::len), Some(64), "{reply}");
    // One read may have been in flight when the command came; a blocked loop answers
    // no other until the reply.
    assert!(during >= 10, "only {during} reads were answered while the bitmap was hashed");
    daemon.quit().unwrap();
}

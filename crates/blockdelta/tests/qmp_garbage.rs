//! Bad input on the QMP monitor never takes `blockdelta serve` down: garbage bytes,
//! invalid UTF-8, deep nesting, huge strings, and every command with arguments of random
//! types. After each, the daemon still answers, and it exits cleanly at the end.

use std::time::Duration;

use testkit::qsd::StorageDaemon;
use testkit::serde_json::{Value, json};
use testkit::{SplitMix64, qemu_img};

fn random_value(rng: &mut SplitMix64, depth: u32) -> Value {
    match rng.up_to(if depth > 2 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => json!(rng.next().is_multiple_of(2)),
        2 => json!(rng.next() as i64 >> rng.up_to(63)),
        3 => json!(
            ["disk0", "file0", "b0", "", "nosuch", "#block001", &"x".repeat(2000)]
                [rng.up_to(6) as usize]
        ),
        4 => Value::Array((0..rng.up_to(3)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => {
            let keys = [
                "node",
                "name",
                "target",
                "device",
                "job-id",
                "sync",
                "bitmap",
                "bitmaps",
                "granularity",
                "persistent",
                "disabled",
                "id",
                "speed",
                "force",
                "actions",
                "type",
                "data",
                "addr",
                "node-name",
                "driver",
                "file",
                "size",
                "writable",
            ];
            let mut map = testkit::serde_json::Map::new();
            for _ in 0..rng.up_to(4) {
                let k = keys[rng.up_to(keys.len() as u64 - 1) as usize];
                map.insert(k.into(), random_value(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

#[test]
fn garbage_and_random_arguments_never_kill_the_daemon() {
    let b = StorageDaemon::builder(env!("CARGO_BIN_EXE_blockdelta")).arg("serve");
    let image = b.path("d.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "16M"]).unwrap();
    qemu_img(["bitmap", "--add", image.to_str().unwrap(), "b0"]).unwrap();
    let mut d = b
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .start()
        .unwrap();
    let alive = |d: &mut StorageDaemon| {
        let v = d.qmp().execute("query-version", Value::Null).unwrap();
        assert_eq!(v["qemu"]["major"], 10);
    };
    // Raw garbage, each on a fresh connection (a syntax error may leave the parser
    // mid-value, as QEMU's does).
    let mut deep = "[".repeat(100_000);
    deep.push_str(&"]".repeat(100_000));
    let big = format!("{{\"execute\": \"{}\"}}", "q".repeat(4 << 20));
    let garbage: Vec<Vec<u8>> = vec![
        b"\xff\xfe\x00\x01garbage\n".to_vec(),
        b"{\"execute\": \"query-version\", \"arguments\": {\"\\ud800\": 1}}\n".to_vec(),
        deep.into_bytes(),
        big.into_bytes(),
        b"}}}}]]]]\n".to_vec(),
        b"{\"execute\": \"query-version\"".to_vec(),
    ];
    for g in &garbage {
        let q = d.connect_qmp(true).unwrap();
        q.send_raw(g).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        d.connect_qmp(true).unwrap();
        alive(&mut d);
    }
    // Every command, random arguments (but not `quit`).
    let commands = d.qmp().execute("query-commands", Value::Null).unwrap();
    let names: Vec<String> = commands
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .filter(|n| n != "quit" && n != "qmp_capabilities")
        .collect();
    let mut rng = SplitMix64(0x9a4b);
    for round in 0..400 {
        let name = &names[rng.up_to(names.len() as u64 - 1) as usize];
        let mut args = random_value(&mut rng, 0);
        if round % 3 == 0 {
            args = json!({"node": "disk0", "name": "b0", "device": "disk0", "target": "disk0",
                          "sync": "full", "job-id": "j", "id": "j"});
        }
        let reply = d.qmp().try_execute(name, args.clone());
        let reply = reply.unwrap_or_else(|e| panic!("{name} {args}: connection lost: {e}"));
        drop(reply);
    }
    alive(&mut d);
    assert!(d.quit().unwrap().success());
}

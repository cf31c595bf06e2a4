//! `MemStorage`: storage semantics, and power-loss simulation for crash tests.

use std::sync::Arc;

use proptest::prelude::*;
use qcow2::storage::{Entry, MemStorage, Op, SECTOR_SIZE, Storage, Survivors};

fn read(storage: &dyn Storage, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xaa; len];
    storage.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn semantics_match_a_file() {
    let s = MemStorage::from_bytes(vec![7; 1000]);
    assert_eq!(read(&s, 900, 200), [vec![7; 100], vec![0; 100]].concat());
    assert_eq!(read(&s, 5000, 10), vec![0; 10]);
    s.read_at(&mut [], u64::MAX).unwrap();
    s.write_at(b"abc", 2000).unwrap();
    assert_eq!(s.len().unwrap(), 2003);
    assert_eq!(read(&s, 1000, 1000), vec![0; 1000]);
    s.discard(500, 10_000).unwrap();
    assert_eq!(s.len().unwrap(), 2003, "a discard keeps the size");
    assert_eq!(read(&s, 490, 20), [vec![7; 10], vec![0; 10]].concat());
    s.discard(5000, 10).unwrap();
    assert_eq!(s.len().unwrap(), 2003);
    s.write_zeroes(3000, 10).unwrap();
    assert_eq!(s.len().unwrap(), 3010);
    s.write_zeroes(0, 0).unwrap();
    s.set_len(10).unwrap();
    assert_eq!(s.to_bytes(), vec![7; 10]);
    s.set_len(0).unwrap();
    assert!(s.is_empty().unwrap());
    assert!(s.write_at(b"x", u64::MAX).is_err());
    assert!(s.write_zeroes(u64::MAX - 1, 10).is_err());
    assert!(s.write_zeroes(1 << 62, 10).is_err());
}

#[test]
fn flush_makes_changes_durable() {
    let s = MemStorage::from_bytes(b"base".to_vec());
    assert_eq!(s.durable_bytes(), b"base");
    s.write_at(b"B", 0).unwrap();
    s.set_len(6).unwrap();
    assert_eq!(s.to_bytes(), b"Base\0\0");
    assert_eq!(s.durable_bytes(), b"base");
    assert_eq!(
        s.unflushed(),
        [Op::Write { offset: 0, data: b"B".to_vec() }, Op::SetLen { len: 6 }]
    );
    assert_eq!(s.flush_count(), 0);
    s.flush().unwrap();
    assert_eq!(s.flush_count(), 1);
    assert_eq!(s.durable_bytes(), b"Base\0\0");
    assert!(s.unflushed().is_empty());
}

#[test]
fn power_cut_keeps_the_chosen_unflushed_changes() {
    let s = MemStorage::from_bytes(vec![1; 8]);
    s.write_at(&[2; 2], 0).unwrap();
    s.write_at(&[3; 2], 4).unwrap();
    s.write_zeroes(6, 4).unwrap();
    s.discard(1, 1).unwrap();
    assert_eq!(s.to_bytes(), [2, 0, 1, 1, 3, 3, 0, 0, 0, 0]);

    assert_eq!(s.power_cut(Survivors::None).to_bytes(), [1; 8]);
    assert_eq!(s.power_cut(Survivors::All).to_bytes(), s.to_bytes());
    assert_eq!(s.power_cut(Survivors::Prefix(1)).to_bytes(), [2, 2, 1, 1, 1, 1, 1, 1]);
    assert_eq!(s.power_cut(Survivors::Prefix(99)).to_bytes(), s.to_bytes());
    let only_zeroes = |_: usize, op: &Op| matches!(op, Op::WriteZeroes { .. });
    assert_eq!(
        s.power_cut(Survivors::Matching(&only_zeroes)).to_bytes(),
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    );
    let odd = |i: usize, _: &Op| i % 2 == 1;
    assert_eq!(s.power_cut(Survivors::Matching(&odd)).to_bytes(), [1, 0, 1, 1, 3, 3, 1, 1]);
    // The result is all durable, and the original is unchanged.
    let cut = s.power_cut(Survivors::Prefix(2));
    assert!(cut.unflushed().is_empty());
    assert_eq!(cut.durable_bytes(), cut.to_bytes());
    assert_eq!(s.unflushed().len(), 4);
    // Random choices depend on the seed only.
    for seed in 0..20 {
        let a = s.power_cut(Survivors::Random(seed)).to_bytes();
        assert_eq!(a, s.power_cut(Survivors::Random(seed)).to_bytes());
    }
    let outcomes: std::collections::BTreeSet<Vec<u8>> =
        (0..64).map(|seed| s.power_cut(Survivors::Random(seed)).to_bytes()).collect();
    assert!(outcomes.len() > 8, "random subsets vary: {}", outcomes.len());
}

#[test]
fn torn_writes_tear_at_sector_boundaries() {
    let sectors = 64;
    let len = (sectors * SECTOR_SIZE) as usize;
    let s = MemStorage::from_bytes(vec![1; len]);
    // Not aligned: the first and last pieces are partial sectors.
    s.write_at(&vec![2; len - 200], 100).unwrap();
    let mut saw_torn = false;
    for seed in 0..32 {
        let cut = s.power_cut(Survivors::Torn(seed)).to_bytes();
        assert_eq!(cut.len(), len);
        assert_eq!(&cut[..100], &[1; 100][..]);
        assert_eq!(&cut[len - 100..], &[1; 100][..]);
        let mut kinds = std::collections::BTreeSet::new();
        for i in 0..sectors {
            // The write's part of sector i: all of it survived, or none.
            let start = (i * SECTOR_SIZE).max(100) as usize;
            let end = ((i + 1) * SECTOR_SIZE).min(len as u64 - 100) as usize;
            let part = &cut[start..end];
            let survived = part.iter().all(|&b| b == 2);
            assert!(survived || part.iter().all(|&b| b == 1), "sector {i} is torn inside");
            kinds.insert(survived);
        }
        saw_torn |= kinds.len() == 2;
    }
    assert!(saw_torn, "some cuts keep part of the write");
    // A set_len is never torn.
    let s = MemStorage::from_bytes(vec![1; 4096]);
    s.set_len(10).unwrap();
    for seed in 0..8 {
        let n = s.power_cut(Survivors::Torn(seed)).len().unwrap();
        assert!(n == 10 || n == 4096, "{n}");
    }
}

/// A workload with three flushes.
fn workload(s: &dyn Storage) {
    s.write_at(b"aaaa", 0).unwrap(); // op 0
    s.flush().unwrap(); // flush 0
    s.write_at(b"bb", 0).unwrap(); // op 1
    s.write_at(b"cc", 4).unwrap(); // op 2
    s.flush().unwrap(); // flush 1
    s.set_len(2).unwrap(); // op 3
    s.flush().unwrap(); // flush 2
    s.write_at(b"d", 2).unwrap(); // op 4
}

#[test]
fn history_rebuilds_every_flush_point() {
    let s = Arc::new(MemStorage::from_bytes(b"zz".to_vec()).with_history());
    // An image would own an Arc<dyn Storage>; the test keeps its own handle.
    let shared: Arc<dyn Storage> = s.clone();
    workload(&shared);
    let history = s.history().unwrap();
    assert_eq!(history.base(), b"zz");
    assert_eq!(history.flush_count(), 3);
    assert_eq!(history.op_count(), 5);
    assert_eq!(history.entries()[1], Entry::Flush);

    let at_flush = |n, survivors| history.power_cut_at_flush(n, survivors).unwrap().to_bytes();
    assert_eq!(at_flush(0, Survivors::None), b"zz");
    assert_eq!(at_flush(0, Survivors::All), b"aaaa");
    assert_eq!(at_flush(1, Survivors::None), b"aaaa");
    assert_eq!(at_flush(1, Survivors::Prefix(1)), b"bbaa");
    assert_eq!(at_flush(1, Survivors::All), b"bbaacc");
    assert_eq!(at_flush(2, Survivors::None), b"bbaacc");
    assert_eq!(at_flush(2, Survivors::All), b"bb");
    assert_eq!(at_flush(3, Survivors::None), b"bb");
    assert_eq!(at_flush(3, Survivors::All), b"bbd");
    assert!(history.power_cut_at_flush(4, Survivors::All).is_none());

    let at_op = |i, survivors| history.power_cut_at_op(i, survivors).unwrap().to_bytes();
    assert_eq!(at_op(0, Survivors::All), b"zz");
    // Flush 0 came before op 1 was issued.
    assert_eq!(at_op(1, Survivors::None), b"aaaa");
    assert_eq!(at_op(1, Survivors::All), b"aaaa");
    assert_eq!(at_op(2, Survivors::None), b"aaaa");
    assert_eq!(at_op(2, Survivors::All), b"bbaa");
    assert_eq!(at_op(5, Survivors::All), s.to_bytes());
    assert!(history.power_cut_at_op(6, Survivors::All).is_none());

    // Recording can start late; it starts from the durable image.
    let s = MemStorage::from_bytes(b"x".to_vec());
    s.write_at(b"y", 0).unwrap();
    s.record_history();
    s.flush().unwrap();
    let history = s.history().unwrap();
    assert_eq!(history.base(), b"x");
    assert_eq!(history.power_cut_at_flush(0, Survivors::None).unwrap().to_bytes(), b"x");
    assert_eq!(history.power_cut_at_flush(1, Survivors::None).unwrap().to_bytes(), b"y");
    assert!(MemStorage::new().history().is_none());
}

#[derive(Clone, Debug)]
enum Step {
    Write(u64, Vec<u8>),
    Discard(u64, u64),
    Zeroes(u64, u64),
    SetLen(u64),
    Flush,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..6000u64, 1..1500usize, 1..=255u8)
            .prop_map(|(o, l, v)| Step::Write(o, vec![v; l])),
        1 => (0..6000u64, 1..3000u64).prop_map(|(o, l)| Step::Discard(o, l)),
        1 => (0..6000u64, 1..3000u64).prop_map(|(o, l)| Step::Zeroes(o, l)),
        1 => (0..8000u64).prop_map(Step::SetLen),
        2 => Just(Step::Flush),
    ]
}

fn run(s: &dyn Storage, step: &Step) {
    match step {
        Step::Write(o, data) => s.write_at(data, *o).unwrap(),
        Step::Discard(o, l) => s.discard(*o, *l).unwrap(),
        Step::Zeroes(o, l) => s.write_zeroes(*o, *l).unwrap(),
        Step::SetLen(l) => s.set_len(*l).unwrap(),
        Step::Flush => s.flush().unwrap(),
    }
}

fn survivors(kind: u8, seed: u64) -> Survivors<'static> {
    match kind {
        0 => Survivors::None,
        1 => Survivors::All,
        2 => Survivors::Prefix(seed as usize % 8),
        3 => Survivors::Random(seed),
        _ => Survivors::Torn(seed),
    }
}

/// The values byte `at` may hold after a power cut, given the durable image and the
/// unflushed changes: its durable value (zero past the durable end), or the value one
/// of the changes covering it gave it.
fn possible(durable: &[u8], unflushed: &[Op], at: u64) -> Vec<u8> {
    let mut values = vec![durable.get(at as usize).copied().unwrap_or(0)];
    for op in unflushed {
        if op.range().contains(&at) {
            values.push(match op {
                Op::Write { offset, data } => data[(at - offset) as usize],
                _ => 0,
            });
        } else if at >= durable.len() as u64 {
            // A change that grew the storage left zeroes behind it.
            values.push(0);
        }
    }
    values
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Cut the power at a random point of a random workload: what was flushed is intact,
    /// everything else is either durable or from an unflushed change, and the cut
    /// storage agrees with the live one and with the history.
    #[test]
    fn durable_part_survives_any_power_cut(
        steps in prop::collection::vec(step(), 0..40),
        cut in any::<prop::sample::Index>(),
        kind in 0..5u8,
        seed in any::<u64>(),
    ) {
        let live = MemStorage::new().with_history();
        // A model: the durable image and the changes since.
        let mut durable: Vec<u8> = Vec::new();
        let cut = cut.index(steps.len() + 1);
        for step in &steps[..cut] {
            run(&live, step);
            if let Step::Flush = step {
                durable = live.to_bytes();
            }
        }
        prop_assert_eq!(live.durable_bytes(), durable.clone());
        let unflushed = live.unflushed();
        let survivors = survivors(kind, seed);
        let crashed = live.power_cut(survivors);
        let bytes = crashed.to_bytes();
        match survivors {
            Survivors::None => prop_assert_eq!(&bytes, &durable),
            Survivors::All => prop_assert_eq!(&bytes, &live.to_bytes()),
            _ => {}
        }
        // Bytes that no unflushed change touched are intact; the others come from the
        // durable image or from a change.
        let max_end = unflushed
            .iter()
            .filter(|op| !matches!(op, Op::Discard { .. } | Op::SetLen { .. }))
            .map(|op| op.range().end)
            .chain(unflushed.iter().filter_map(|op| match op {
                Op::SetLen { len } => Some(*len),
                _ => None,
            }))
            .chain([durable.len() as u64])
            .max()
            .unwrap();
        prop_assert!(bytes.len() as u64 <= max_end);
        for (at, &b) in bytes.iter().enumerate() {
            let values = possible(&durable, &unflushed, at as u64);
            prop_assert!(values.contains(&b), "byte {} is {}, not one of {:?}", at, b, values);
        }
        if !unflushed.iter().any(|op| matches!(op, Op::SetLen { .. })) {
            prop_assert!(bytes.len() >= durable.len());
            for (at, &b) in durable.iter().enumerate() {
                if !unflushed.iter().any(|op| op.range().contains(&(at as u64))) {
                    prop_assert_eq!(bytes[at], b, "untouched byte {} changed", at);
                }
            }
        }

        // The history gives the same storage at the same point.
        let history = live.history().unwrap();
        let replayed = history.power_cut_at_op(history.op_count(), survivors).unwrap();
        prop_assert_eq!(replayed.to_bytes(), bytes);

        // And at every flush point, losing everything unflushed leaves the image as of
        // the previous flush.
        let mut images = vec![Vec::new()];
        let model = MemStorage::new();
        for step in &steps[..cut] {
            run(&model, step);
            if let Step::Flush = step {
                images.push(model.to_bytes());
            }
        }
        for (n, image) in images.iter().enumerate() {
            let at = history.power_cut_at_flush(n, Survivors::None).unwrap();
            prop_assert_eq!(&at.to_bytes(), image, "flush point {}", n);
        }
        let last = history.power_cut_at_flush(images.len() - 1, Survivors::All).unwrap();
        prop_assert_eq!(last.to_bytes(), live.to_bytes());
    }
}

//! The write hook must not allocate: it runs on every guest write, under the node's
//! bitmap lock. A counting allocator checks it on the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use blockdelta::block::dirty_bitmap::{AddBitmap, NodeBitmaps};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// thread-local `Cell` of a `Copy` type, which does not allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn set_dirty_does_not_allocate() {
    let node = NodeBitmaps::new("disk0", 1 << 40, Some(65536), None);
    for (name, granularity) in [("a", 512), ("b", 65536), ("c", 1 << 21)] {
        node.add(&AddBitmap {
            name: name.into(),
            granularity: Some(granularity),
            ..Default::default()
        })
        .unwrap();
    }
    let before = allocations();
    let mut offset = 12345u64;
    for i in 0..10_000u64 {
        offset =
            offset.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) % (1 << 40);
        node.set_dirty(offset, 4096 + (i % 7) * 65536);
    }
    node.set_dirty(0, 1 << 30);
    assert_eq!(allocations() - before, 0, "the write hook allocated");
    // The counter does count: a query allocates its records.
    let q = node.query();
    assert!(allocations() > before);
    assert!(q.iter().all(|b| b.count > 0));
}

//! Block nodes and what hangs off them: so far, their dirty bitmaps.

pub mod dirty_bitmap;

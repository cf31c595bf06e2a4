//! Jobs: the backup job and its block-copy engine.

pub mod block_copy;

//! Jobs: the backup job and its block-copy engine.

pub mod backup;
pub mod block_copy;

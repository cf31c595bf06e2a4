//! Block nodes, the graph that names them, and their dirty bitmaps.

pub mod blkdebug;
pub mod dirty_bitmap;
pub mod file;
pub mod graph;
pub mod node;
pub mod options;
pub mod qcow2;
pub mod raw;

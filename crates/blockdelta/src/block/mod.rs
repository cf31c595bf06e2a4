//! Block nodes and their dirty bitmaps.

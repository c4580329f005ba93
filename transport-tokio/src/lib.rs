//! tokio transport (work in progress).

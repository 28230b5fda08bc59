//! Shared helpers for Causeway's benchmark binaries (`src/bin/*.rs`).

//! See `tests/model.rs`.

//! Helpers for loopback integration tests.

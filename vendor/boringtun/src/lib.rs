// Copyright (c) 2019 Cloudflare, Inc. All rights reserved.
// SPDX-License-Identifier: BSD-3-Clause

//! Simple implementation of the client-side of the WireGuard protocol.
//!
//! <code>git clone https://github.com/cloudflare/boringtun.git</code>

// Vendored: the published crate's code as it is, so its compiler warnings (a deprecated ring
// function, an elided lifetime) are silenced here rather than fixed.
#![allow(deprecated, mismatched_lifetime_syntaxes)]

// Vendored into Tern with its session slots boxed; see ../PATCHES.md. The
// `device`, `ffi-bindings` and `jni-bindings` parts of the crate are left out.
pub mod noise;

#[cfg(not(feature = "mock-instant"))]
pub(crate) mod sleepyinstant;

/// Re-export of the x25519 types
pub mod x25519 {
    pub use x25519_dalek::{
        EphemeralSecret, PublicKey, ReusableSecret, SharedSecret, StaticSecret,
    };
}

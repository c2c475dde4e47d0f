//! Sans-IO cores of the lighthouse.

pub mod admission;
pub mod lighthouse;
pub mod registry;
pub mod relay;

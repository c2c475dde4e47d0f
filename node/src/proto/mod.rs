//! Sans-IO cores of the node.

pub mod node;

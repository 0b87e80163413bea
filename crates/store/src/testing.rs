//! Behaviour tests shared by every [`Store`](crate::Store) implementation.

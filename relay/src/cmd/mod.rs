//! One module per client frame kind. Each parses its frame, checks everything, and only then
//! changes the store (through a [`Change`](crate::hub::Change), whose `apply` cannot fail) and
//! says what to send.

pub mod create_session;
pub mod data;
pub mod forward;
pub mod invite_create;
pub mod join;
pub mod join_answer;
pub mod reattach;

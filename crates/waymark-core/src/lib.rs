//! Waymark's domain model, shared by every other crate.
//!
//! "Contract §N", here and in every crate, doc and `.proto` of the
//! repository, is section N of the project's statement of its external
//! contract, `docs/contract.md`.
//!
//! # Layout
//! - [`event`]: the validated, upcast event ([`Event`], [`EventData`]) that
//!   processors fold, and its canonical JSON form on `waymark.events`.
//! - [`identity`]: cross-platform identities and the deterministic default
//!   person id of contract §2.
//! - [`fold`]: the [`Fold`] contract of a projection processor, and
//!   [`Tracked`], the per-person record the runtime stores around a fold's
//!   state (log position + duplicate window).
//! - [`reject`]: the dead-letter kinds of contract §5.
//!
//! # Guarantees
//! Nothing here does IO. A [`Fold`] is a pure function of its state and an
//! event, so replaying a log from offset 0 reproduces the same state, and
//! [`Tracked::apply`] makes redeliveries (same log position) and duplicate
//! event ids (contract §4) no-ops.

pub mod event;
pub mod fold;
pub mod identity;
pub mod reject;

pub use event::{
    ContentType, Direction, Event, EventData, EventType, InteractionKind, LessonResult,
};
pub use fold::{ApplyOutcome, Fold, Position, Tracked};
pub use identity::{default_person_id, Identity};
pub use reject::{RejectKind, Rejection};

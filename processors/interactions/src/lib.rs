//! The interactions processor: a pure fold over Waymark events

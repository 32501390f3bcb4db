//! The learning processor: a pure fold over Waymark events

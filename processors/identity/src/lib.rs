//! The identity processor: a pure fold over Waymark events

//! The person processor: a pure fold over Waymark events

//! The journey processor: a pure fold over Waymark events

//! The waymark command line

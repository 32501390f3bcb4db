//! Validation of raw events against the JSON Schemas in schemas/, and upcasting

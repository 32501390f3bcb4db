//! topology.yaml: topics, processors and projections, parsed strictly

//! The cluster engine: the loop thread's side of the Redis link (to be written).

/// The cluster engine (see the [module docs](super)).
pub struct ClusterEngine;

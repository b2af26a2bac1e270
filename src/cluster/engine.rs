//! The cluster engine: the loop thread's side of the Redis link (stub until the link lands).

use std::time::Instant;

use crate::config::Config;
use crate::store::engine::{Engine, Reply, Request};

use super::NodeId;

/// The cluster engine (see the [module docs](super)).
pub struct ClusterEngine;

impl ClusterEngine {
    /// A fresh node id.
    pub fn new_node_id() -> NodeId {
        uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
    }

    /// Connects to Redis.
    pub fn open(
        _cfg: &Config,
        _node: NodeId,
        _notify: Box<dyn Fn() + Send>,
    ) -> Result<Self, String> {
        Err("cluster mode is not wired yet".into())
    }
}

impl Engine for ClusterEngine {
    fn request(&mut self, _req: Request) {}
    fn poll(&mut self) -> Option<Reply> {
        None
    }
    fn writable(&self) -> bool {
        false
    }
    fn flush(&mut self) {}
    fn close(&mut self, _deadline: Instant) -> u64 {
        0
    }
}

//! The core's side of cluster mode (to be written).

use crate::chat::{Chat, Outbox};

impl Chat {
    /// Applies one input from the cluster engine.
    pub(super) fn apply_cluster(&mut self, event: crate::cluster::Event, out: &mut impl Outbox) {
        let _ = (event, out);
    }
}

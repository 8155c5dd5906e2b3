//! Task events, published to containerd's ttrpc events address.

use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::ttrpc::context::Context;

/// The publisher and the namespace every event is published in.
pub struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("address", &self.publisher.address)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher,
            namespace: namespace.to_string(),
        }
    }

    /// Queues `event` on its topic. The publisher retries on its own; a
    /// failure to queue is logged, never returned: a lost event must not
    /// fail the call that caused it.
    pub async fn publish<E: Event + Send + 'static>(&self, event: E) {
        let topic = event.topic();
        tracing::debug!(%topic, "publishing event");
        if let Err(e) = self
            .publisher
            .publish(Context::default(), &topic, &self.namespace, Box::new(event))
            .await
        {
            tracing::warn!(%topic, error = %e, "cannot publish event");
        }
    }
}

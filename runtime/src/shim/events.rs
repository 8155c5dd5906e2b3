//! Task events, published to containerd's ttrpc events address.

use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::ttrpc::context::Context;

/// The publisher and the namespace every event is published in.
pub struct Events {
    /// `None` in unit tests, which record topics instead, and where no
    /// containerd listens ([`Self::unpublished`]).
    publisher: Option<RemotePublisher>,
    namespace: String,
    #[cfg(test)]
    recorded: std::sync::Mutex<Vec<String>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("address", &self.publisher.as_ref().map(|p| &p.address))
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher: Some(publisher),
            namespace: namespace.to_string(),
            #[cfg(test)]
            recorded: std::sync::Mutex::default(),
        }
    }

    /// Events that go nowhere: a front door without containerd
    /// (`nutshell-runc`) has no one to tell.
    pub fn unpublished(namespace: &str) -> Self {
        Self {
            publisher: None,
            namespace: namespace.to_string(),
            #[cfg(test)]
            recorded: std::sync::Mutex::default(),
        }
    }

    /// Events that are only recorded ([`Self::topics`]).
    #[cfg(test)]
    pub fn recorded(namespace: &str) -> Self {
        Self::unpublished(namespace)
    }

    /// The topics published so far.
    #[cfg(test)]
    pub fn topics(&self) -> Vec<String> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues `event` on its topic. The publisher retries on its own; a
    /// failure to queue is logged, never returned: a lost event must not
    /// fail the call that caused it.
    pub async fn publish<E: Event + Send + 'static>(&self, event: E) {
        let topic = event.topic();
        tracing::debug!(%topic, "publishing event");
        #[cfg(test)]
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(topic.clone());
        let Some(publisher) = &self.publisher else {
            return;
        };
        if let Err(e) = publisher
            .publish(Context::default(), &topic, &self.namespace, Box::new(event))
            .await
        {
            tracing::warn!(%topic, error = %e, "cannot publish event");
        }
    }
}

//! Task events, published to containerd's ttrpc events address.

use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::ttrpc::context::Context;

/// Where events go.
enum Sink {
    Remote(RemotePublisher),
    /// Unit tests: the topics, in order.
    #[cfg(test)]
    Recorded(std::sync::Mutex<Vec<String>>),
}

/// The publisher and the namespace every event is published in.
pub struct Events {
    sink: Sink,
    namespace: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Events");
        match &self.sink {
            Sink::Remote(p) => d.field("address", &p.address),
            #[cfg(test)]
            Sink::Recorded(_) => d.field("recorded", &true),
        };
        d.field("namespace", &self.namespace).finish()
    }
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            sink: Sink::Remote(publisher),
            namespace: namespace.to_string(),
        }
    }

    /// Events that are only recorded ([`Self::topics`]).
    #[cfg(test)]
    pub fn recorded(namespace: &str) -> Self {
        Self {
            sink: Sink::Recorded(std::sync::Mutex::default()),
            namespace: namespace.to_string(),
        }
    }

    /// The topics published so far (recorded events only).
    #[cfg(test)]
    pub fn topics(&self) -> Vec<String> {
        match &self.sink {
            Sink::Recorded(t) => t.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            Sink::Remote(_) => Vec::new(),
        }
    }

    /// Queues `event` on its topic. The publisher retries on its own; a
    /// failure to queue is logged, never returned: a lost event must not
    /// fail the call that caused it.
    pub async fn publish<E: Event + Send + 'static>(&self, event: E) {
        let topic = event.topic();
        tracing::debug!(%topic, "publishing event");
        let publisher = match &self.sink {
            Sink::Remote(p) => p,
            #[cfg(test)]
            Sink::Recorded(t) => {
                t.lock().unwrap_or_else(|e| e.into_inner()).push(topic);
                return;
            }
        };
        if let Err(e) = publisher
            .publish(Context::default(), &topic, &self.namespace, Box::new(event))
            .await
        {
            tracing::warn!(%topic, error = %e, "cannot publish event");
        }
    }
}

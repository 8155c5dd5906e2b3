//! The container engine.

pub mod init;

/// Placeholder engine until containers land.
#[derive(Default)]
pub struct Engine {
    _private: (),
}

impl Engine {
    /// Stops every container.
    pub async fn destroy_all(&self) {}
}

//! H.264 for viewers that decode it (RDP's graphics pipeline, AVC420): one encoder per console
//! and size, shared by every such viewer (`stream`), fed the framebuffer's damage (`encoder`).

pub mod encoder;
pub mod stream;

pub use stream::{Frame, Subscription, Video};

/// Pictures per second the shared stream makes at most.
pub const MAX_FPS: f32 = 30.0;

//! H.264 for viewers that decode it (RDP's graphics pipeline, AVC420): one encoder per console
//! and size, shared by every such viewer (`stream`), fed the framebuffer's damage (`encoder`);
//! session recordings are one more subscriber (`record`, fragmented MP4 from `mp4`).

pub mod encoder;
pub mod mp4;
pub mod record;
pub mod stream;

pub use stream::{Frame, Subscription, Video};

/// Pictures per second the shared stream makes at most.
pub const MAX_FPS: f32 = 30.0;

//! The answer handed back: its body streamed through after what the layer read ahead, the
//! server-sent events it looks at before committing, and the `usage` it reads on the way.

pub(crate) mod body;
pub(crate) mod commit;
pub(crate) mod ending;
pub(crate) mod sse;
pub(crate) mod usage;

pub use body::ResponseBody;
pub use commit::CommitPoint;

pub use mirror_core;
pub use mirror_scheduler;

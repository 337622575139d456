pub use mirror_core;

//! The decoder shared by every architecture ([`transformer`]), its blocks (`layers`,
//! `attention`, `linear`, `rope`, `cpu_ops`), the weight loader that builds them from a
//! [`WeightSource`](crate::weights::WeightSource) (`loader`), and lookahead tokens
//! ([`lookahead`]). Models import the data types and kernels below them (config, weights'
//! interface, kernels, kv_cache, mask, threads, error), never `formats` or `loading`: a model
//! does not know how its weights are stored or loaded. What each architecture changes is data,
//! in [`config`](crate::config).

pub(crate) mod attention;
pub(crate) mod cpu_ops;
pub mod layers;
pub(crate) mod linear;
pub(crate) mod loader;
pub mod lookahead;
pub(crate) mod partial_head;
pub mod ragged;
pub(crate) mod rope;
pub mod transformer;

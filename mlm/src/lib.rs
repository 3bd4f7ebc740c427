//! rs-mlm

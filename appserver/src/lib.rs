//! rs-appserver

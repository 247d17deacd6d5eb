//! The health monitor against a scripted status page and the loopback mock.

//! RateLimitPacingLayer over the loopback mock.

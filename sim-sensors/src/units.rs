//! Constants the recordings, generators and requests share.

/// Standard gravity: x-io devices report acceleration in g.
pub const STANDARD_GRAVITY: f64 = 9.806_65;

/// Latest sensor time a request may start at, or a fault may refer to: a century in
/// nanoseconds, far from where u64 sensor time would wrap.
pub const MAX_SENSOR_NS: u64 = 100 * 365 * 24 * 3600 * 1_000_000_000;

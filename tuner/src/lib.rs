//! The built-in tuner of the `vmm` monitor.
//!
//! Empty for now: the performance monitoring agent, the ONNX policy, the configuration
//! manager and the state repository land with the telemetry and tuner issues. The monitor
//! will reach the tuner only through one narrow trait (read counters, apply an action).

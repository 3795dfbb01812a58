//! Which burn device computes. Binaries pick; libraries take a `Device`.

use burn::tensor::Device;

/// The CPU device used by default: burn's ndarray backend. burn 0.22 marks it deprecated in
/// favour of `flex`; it stays the default until the two are benchmarked against each other.
#[allow(deprecated)]
pub fn cpu_device() -> Device {
    Device::ndarray()
}

//! Which burn device computes. Binaries pick; libraries take a `Device`.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// The CPU device used by default: burn's ndarray backend. burn 0.22 marks it deprecated in
/// favour of `flex`; it stays the default until the two are benchmarked against each other.
#[allow(deprecated)]
pub fn cpu_device() -> Device {
    Device::ndarray()
}

/// Whether burn's own convolution beats the `cnn` expert's im2col on `device`: on flex,
/// measured; ndarray's weight gradient is the slow case im2col exists for.
pub(crate) fn convolves_natively(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    let _ = device;
    false
}

/// The backend a device trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// burn's ndarray backend on the CPU: the default, and the one whose results the
    /// simulator reproduces bit for bit.
    #[default]
    Ndarray,
    /// burn's wgpu backend on the best adapter wgpu finds (Vulkan, Metal, GL: a Jetson's
    /// GPU, or Mesa's lavapipe on a CPU). Needs the `wgpu` feature. Sums run in another
    /// order than on the CPU, so results match ndarray's to float rounding, not bit for bit.
    Wgpu,
    /// burn's flex backend on the CPU, which burn 0.22 names ndarray's successor. Needs the
    /// `flex` feature; benchmarked against ndarray by `ddome bench train --backend flex`.
    Flex,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Ndarray => "ndarray",
            BackendChoice::Wgpu => "wgpu",
            BackendChoice::Flex => "flex",
        })
    }
}

impl FromStr for BackendChoice {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ndarray" | "cpu" => Ok(BackendChoice::Ndarray),
            "wgpu" | "gpu" => Ok(BackendChoice::Wgpu),
            "flex" => Ok(BackendChoice::Flex),
            other => Err(BackendError::Unknown(other.to_string())),
        }
    }
}

/// Why a backend could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Not a backend name.
    #[error("unknown backend {0:?}: expected ndarray, flex or wgpu")]
    Unknown(String),
    /// This binary was built without the backend.
    #[error("this build has no {0} backend: rebuild with `--features {0}`")]
    NotBuilt(BackendChoice),
    /// wgpu found no usable adapter, or could not start on it.
    #[error("wgpu could not start on any adapter: {0}")]
    NoAdapter(String),
}

/// The device for `choice`. wgpu's runtime starts on the first call and is reused by later
/// ones; a failed start is an error, never a panic.
pub fn device(choice: BackendChoice) -> Result<Device, BackendError> {
    match choice {
        BackendChoice::Ndarray => Ok(cpu_device()),
        BackendChoice::Wgpu => wgpu_device(),
        BackendChoice::Flex => flex_device(),
    }
}

/// [`device`], except that when wgpu cannot start and `fallback` is set, the reason is
/// logged and the CPU device is returned instead. Returns the backend actually chosen.
pub fn device_or_cpu(
    choice: BackendChoice,
    fallback: bool,
) -> Result<(Device, BackendChoice), BackendError> {
    match device(choice) {
        Ok(device) => Ok((device, choice)),
        Err(e) if fallback && choice != BackendChoice::Ndarray => {
            tracing::warn!(error = %e, "falling back to the ndarray backend on the CPU");
            Ok((cpu_device(), BackendChoice::Ndarray))
        }
        Err(e) => Err(e),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, BackendError> {
    use std::sync::OnceLock;

    // burn refuses to start a runtime twice in one process, so the first outcome is kept,
    // failure included (a missing adapter does not appear later).
    static WGPU: OnceLock<Result<Device, BackendError>> = OnceLock::new();
    WGPU.get_or_init(|| {
        Device::wgpu_options()
            .init()
            .map_err(|e| BackendError::NoAdapter(e.to_string()))
    })
    .clone()
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device, BackendError> {
    Err(BackendError::NotBuilt(BackendChoice::Wgpu))
}

#[cfg(feature = "flex")]
fn flex_device() -> Result<Device, BackendError> {
    Ok(Device::flex())
}

#[cfg(not(feature = "flex"))]
fn flex_device() -> Result<Device, BackendError> {
    Err(BackendError::NotBuilt(BackendChoice::Flex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!("ndarray".parse(), Ok(BackendChoice::Ndarray));
        assert_eq!("wgpu".parse(), Ok(BackendChoice::Wgpu));
        assert_eq!("flex".parse(), Ok(BackendChoice::Flex));
        assert_eq!(
            "cuda".parse::<BackendChoice>(),
            Err(BackendError::Unknown("cuda".into()))
        );
        assert_eq!(BackendChoice::Wgpu.to_string(), "wgpu");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn without_the_feature_wgpu_is_an_error_or_the_cpu_when_falling_back() {
        assert_eq!(
            device(BackendChoice::Wgpu).unwrap_err(),
            BackendError::NotBuilt(BackendChoice::Wgpu)
        );
        assert!(
            device_or_cpu(BackendChoice::Wgpu, false).is_err(),
            "no fallback unless asked"
        );
        let (_, chosen) = device_or_cpu(BackendChoice::Wgpu, true).unwrap();
        assert_eq!(chosen, BackendChoice::Ndarray);
    }

    #[cfg(not(feature = "flex"))]
    #[test]
    fn without_the_feature_flex_is_an_error_naming_the_feature() {
        let err = device(BackendChoice::Flex).unwrap_err();
        assert_eq!(err, BackendError::NotBuilt(BackendChoice::Flex));
        assert!(err.to_string().contains("--features flex"), "{err}");
    }

    #[cfg(feature = "flex")]
    #[test]
    fn flex_runs_a_matrix_product_like_ndarray() {
        let a = [[1.0f32, 2.0], [3.0, 4.0]];
        let product = |device: &Device| {
            let t = burn::tensor::Tensor::<2>::from_floats(a, device);
            t.clone()
                .matmul(t)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let flex = device(BackendChoice::Flex).unwrap();
        assert_eq!(product(&flex), product(&cpu_device()));
        assert_eq!(product(&flex), vec![7.0, 10.0, 15.0, 22.0]);
    }
}

//! Which CUDA libraries a device may use: each is loaded at run time, so a missing one, one of
//! another major version (its ABI differs) or one that fails to start must be a clear decision
//! made before any model runs, never a panic on first use. cuBLASLt is required; cuDNN is
//! optional (convolutions fall back to im2col + cuBLASLt without it).

/// What to do with a library.
#[derive(Debug, PartialEq, Eq)]
pub enum LibDecision {
    Use,
    /// Optional and unusable: go on without it, saying why once.
    Skip(String),
    /// Required and unusable: the device cannot open.
    Fail(String),
}

/// `version` as the library reports it (`major·10000 + minor·100 + patch`, as cublasLtGetVersion
/// and cudnnGetVersion do); `started`: whether creating its handle worked (Err: why not).
pub fn decide(
    name: &str,
    present: bool,
    version: Option<usize>,
    want_major: usize,
    started: Result<(), String>,
    optional: bool,
) -> LibDecision {
    let why = if !present {
        Some(format!(
            "no {name} library found (searched the loader path)"
        ))
    } else if let Some(v) = version.filter(|v| v / 10000 != want_major) {
        Some(format!(
            "{name} {}.{}.{} is loaded but toffee is built for major version {want_major}",
            v / 10000,
            v / 100 % 100,
            v % 100
        ))
    } else {
        started
            .err()
            .map(|e| format!("{name} is present but does not start: {e}"))
    };
    match (why, optional) {
        (None, _) => LibDecision::Use,
        (Some(w), true) => LibDecision::Skip(w),
        (Some(w), false) => LibDecision::Fail(w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_libraries_fail_and_optional_ones_are_skipped() {
        assert_eq!(
            decide("cuBLASLt", true, Some(130_100), 13, Ok(()), false),
            LibDecision::Use
        );
        let LibDecision::Fail(w) = decide("cuBLASLt", false, None, 13, Ok(()), false) else {
            panic!()
        };
        assert!(w.contains("no cuBLASLt library"), "{w}");
        let LibDecision::Fail(w) = decide("cuBLASLt", true, Some(120_403), 13, Ok(()), false)
        else {
            panic!()
        };
        assert!(
            w.contains("12.4.3") && w.contains("major version 13"),
            "{w}"
        );
        let LibDecision::Skip(w) = decide(
            "cuDNN",
            true,
            Some(90_300),
            9,
            Err("CUDNN_STATUS_NOT_INITIALIZED".into()),
            true,
        ) else {
            panic!()
        };
        assert!(
            w.contains("does not start") && w.contains("NOT_INITIALIZED"),
            "{w}"
        );
        assert!(matches!(
            decide("cuDNN", false, None, 9, Ok(()), true),
            LibDecision::Skip(_)
        ));
    }
}

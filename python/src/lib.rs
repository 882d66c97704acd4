//! `toffee._toffee`: the Python extension module. It calls the same library functions as the
//! CLI and the C ABI (loading, `pipeline::request`, `Generator::run`, `Scorer`, `cmd::embed`,
//! `ViewGenerator`, `dataset::run`); the Python
//! package around it (python/toffee/__init__.py) turns numpy arrays and PIL images into the
//! raw pixel tuples taken here and the returned bytes back into arrays.
//!
//! Every error crosses the boundary as `toffee.ToffeeError` carrying toffee's own message; the
//! GIL is released while models load and run.

mod embed;
mod engine;
mod pairs;
mod pixels;
mod score;
mod source;
mod view;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _toffee,
    ToffeeError,
    PyException,
    "An error reported by toffee (bad input, a model that cannot load, a failed run)."
);

/// A toffee error as a Python exception, with its whole chain of context (`{:#}`, as the CLI
/// prints it).
pub(crate) fn to_py_err(e: anyhow::Error) -> PyErr {
    ToffeeError::new_err(format!("{e:#}"))
}

/// `Result<T, anyhow::Error>` to `PyResult<T>`.
pub(crate) fn py_result<T>(r: anyhow::Result<T>) -> PyResult<T> {
    r.map_err(to_py_err)
}

#[pymodule]
fn _toffee(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ToffeeError", m.py().get_type::<ToffeeError>())?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<score::Scorer>()?;
    m.add_class::<embed::Embedder>()?;
    m.add_class::<view::ViewGenerator>()?;
    m.add_function(wrap_pyfunction!(pairs::pairs, m)?)?;
    Ok(())
}

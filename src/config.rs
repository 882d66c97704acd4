//! Typed access to a model's config.json, with errors that name the file and the field.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct Config {
    pub path: PathBuf,
    pub json: serde_json::Map<String, Value>,
}

impl Config {
    pub fn read(path: &Path) -> Result<Config> {
        let text = crate::input::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        match json {
            Value::Object(json) => Ok(Config {
                path: path.to_path_buf(),
                json,
            }),
            _ => bail!("{}: expected a JSON object", path.display()),
        }
    }

    /// A config made in code (the built-in model); `path` is what errors call it.
    pub fn from_json(path: &str, json: Value) -> Result<Config> {
        match json {
            Value::Object(json) => Ok(Config {
                path: PathBuf::from(path),
                json,
            }),
            _ => bail!("{path}: expected a JSON object"),
        }
    }

    pub fn read_dir(dir: &Path) -> Result<Config> {
        Config::read(&dir.join("config.json"))
    }

    fn err(&self, field: &str, what: &str) -> anyhow::Error {
        anyhow!("{}: field `{field}` {what}", self.path.display())
    }

    /// Present and not null.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize> {
        match self.get(field) {
            None => Err(self.err(field, "is missing")),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(field, &format!("must be a non-negative integer, got {v}"))
            }),
        }
    }

    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        if self.get(field).is_none() {
            return Ok(default);
        }
        self.usize(field)
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, &format!("must be a number, got {v}"))),
        }
    }

    /// Sizes a config claims, bounded before anything is built from them (random-weight stores
    /// synthesise whatever a config asks for, and real loaders size buffers from it): a number or
    /// each number of a list in `field` must be at most its limit.
    pub fn check_sizes(&self, limits: &[(&str, u64)]) -> Result<()> {
        for &(field, max) in limits {
            let Some(v) = self.get(field) else { continue };
            let vals: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                _ => vec![v],
            };
            for x in vals {
                if let Some(n) = x.as_u64() {
                    if n > max {
                        return Err(self.err(
                            field,
                            &format!("is {n}, above {max} (far beyond any released model)"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A normalisation epsilon: finite and > 0 (a negative one makes rsqrt of a possibly negative
    /// variance: NaN images).
    pub fn eps_or(&self, field: &str, default: f64) -> Result<f64> {
        let v = self.f64_or(field, default)?;
        if !(v.is_finite() && v > 0.0 && v < 1.0) {
            return Err(self.err(field, &format!("must be a small positive number, got {v}")));
        }
        Ok(v)
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, &format!("must be true or false, got {v}"))),
        }
    }

    pub fn str(&self, field: &str) -> Result<&str> {
        match self.get(field) {
            None => Err(self.err(field, "is missing")),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(field, &format!("must be a string, got {v}"))),
        }
    }

    pub fn str_or<'a>(&'a self, field: &str, default: &'a str) -> Result<&'a str> {
        if self.get(field).is_none() {
            return Ok(default);
        }
        self.str(field)
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        if self.get(field).is_none() {
            return Ok(None);
        }
        self.str(field).map(Some)
    }

    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        if self.get(field).is_none() {
            return Ok(None);
        }
        self.usize(field).map(Some)
    }

    pub fn usize_list(&self, field: &str) -> Result<Vec<usize>> {
        match self.get(field) {
            None => Err(self.err(field, "is missing")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.err(field, "must be a list of non-negative integers")),
            Some(v) => Err(self.err(field, &format!("must be a list, got {v}"))),
        }
    }

    /// An integer or a per-block list of `n` integers (diffusers accepts both for many fields).
    pub fn usize_per_block(&self, field: &str, n: usize) -> Result<Vec<usize>> {
        match self.get(field) {
            Some(Value::Array(_)) => {
                let v = self.usize_list(field)?;
                if v.len() != n {
                    return Err(self.err(
                        field,
                        &format!("has {} entries, expected one per block ({n})", v.len()),
                    ));
                }
                Ok(v)
            }
            _ => Ok(vec![self.usize(field)?; n]),
        }
    }

    pub fn str_list(&self, field: &str) -> Result<Vec<String>> {
        match self.get(field) {
            None => Err(self.err(field, "is missing")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.err(field, "must be a list of strings")),
            Some(v) => Err(self.err(field, &format!("must be a list, got {v}"))),
        }
    }

    /// An error for a value the engine does not implement.
    pub fn unsupported(
        &self,
        field: &str,
        value: impl std::fmt::Display,
        supported: &str,
    ) -> anyhow::Error {
        anyhow!(
            "{}: field `{field}` = {value} is not supported (supported: {supported})",
            self.path.display()
        )
    }
}

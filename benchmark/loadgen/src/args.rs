//! A tiny command-line parser: `SUBCOMMAND --key value --key=value --flag`.
//!
//! Every option is looked up by name; `finish` rejects names nobody asked for, so a typo
//! is an error instead of a silently ignored setting.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

pub struct Args {
    pub subcommand: Option<String>,
    values: BTreeMap<String, Option<String>>,
    used: RefCell<BTreeSet<String>>,
}

impl Args {
    pub fn parse(argv: &[String]) -> Result<Args, String> {
        let mut subcommand = None;
        let mut values = BTreeMap::new();
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            if let Some(name) = a.strip_prefix("--") {
                if let Some((k, v)) = name.split_once('=') {
                    values.insert(k.to_string(), Some(v.to_string()));
                } else if i + 1 < argv.len() && !argv[i + 1].starts_with("--") {
                    values.insert(name.to_string(), Some(argv[i + 1].clone()));
                    i += 1;
                } else {
                    values.insert(name.to_string(), None);
                }
            } else if subcommand.is_none() {
                subcommand = Some(a.clone());
            } else {
                return Err(format!("unexpected argument '{a}'"));
            }
            i += 1;
        }
        Ok(Args {
            subcommand,
            values,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.used.borrow_mut().insert(name.to_string());
        self.values.contains_key(name)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.used.borrow_mut().insert(name.to_string());
        match self.values.get(name) {
            None => false,
            Some(None) => true,
            Some(Some(v)) => !matches!(v.as_str(), "0" | "false" | "no" | "off"),
        }
    }

    pub fn str_or(&self, name: &str, default: &str) -> String {
        self.used.borrow_mut().insert(name.to_string());
        match self.values.get(name) {
            Some(Some(v)) => v.clone(),
            _ => default.to_string(),
        }
    }

    pub fn opt_str(&self, name: &str) -> Option<String> {
        self.used.borrow_mut().insert(name.to_string());
        self.values.get(name).cloned().flatten()
    }

    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        self.used.borrow_mut().insert(name.to_string());
        match self.values.get(name) {
            Some(Some(v)) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse '{v}'")),
            Some(None) => Err(format!("--{name} needs a value")),
            None => Ok(default),
        }
    }

    /// Comma-separated list, e.g. `--rates 500,1000,2000`.
    pub fn list<T: FromStr + Clone>(&self, name: &str, default: &[T]) -> Result<Vec<T>, String> {
        self.used.borrow_mut().insert(name.to_string());
        match self.values.get(name) {
            Some(Some(v)) => v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .map_err(|_| format!("--{name}: cannot parse '{s}'"))
                })
                .collect(),
            Some(None) => Err(format!("--{name} needs a value")),
            None => Ok(default.to_vec()),
        }
    }

    pub fn finish(&self) -> Result<(), String> {
        let used = self.used.borrow();
        let unknown: Vec<&String> = self.values.keys().filter(|k| !used.contains(*k)).collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "unknown option(s): {unknown:?} (see `loadgen help`)"
            ))
        }
    }
}

//! The checks and conversions of single param values: a value against its declared type, the
//! limits every run's params keep whatever the DAG declares, and `--param NAME=TEXT` made JSON.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{MAX_PARAMS_BYTES, ParamSpec, ParamType, Pattern, param_env_name};
use crate::task::Params;

/// A plain word: letters, digits, `_`, `-` and `.`, starting with a letter, digit or `_` (so it
/// is never an option), at most 200 characters. Such a text means the same to every shell and
/// program.
pub fn check_plain_word(word: &str) -> Result<(), String> {
    if word.is_empty() || word.len() > 200 {
        return Err("not a plain word: 1 to 200 characters".to_string());
    }
    if word.starts_with(['-', '.']) {
        return Err("not a plain word: it starts with '-' or '.'".to_string());
    }
    if let Some(bad) = word.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("not a plain word: it contains {bad:?} (use letters, digits, '_', '-' and '.')"));
    }
    Ok(())
}

/// `value` as the param `spec` wants it, normalised; the error says what was expected.
pub(super) fn check_value(spec: &ParamSpec, pattern: Option<&Pattern>, value: Value) -> Result<Value, String> {
    let Some(kind) = spec.kind else { return Ok(value) };
    let expected = |what: &str| format!("expected {what}, got {}", describe(&value));
    match kind {
        ParamType::String => {
            let Value::String(text) = &value else { return Err(expected("a string")) };
            if let Some(max) = spec.max_length {
                let length = text.chars().count();
                if length > max {
                    return Err(format!("longer than {max} characters ({length})"));
                }
            }
            if let Some(pattern) = pattern
                && !pattern.matches(text)
            {
                return Err(format!("{} does not match the pattern {}", short(text), pattern.as_str()));
            }
            if spec.pattern.is_some() && pattern.is_none() {
                return Err("its pattern was never compiled (the schema was not validated)".to_string());
            }
            Ok(value)
        }
        ParamType::Integer => match &value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value),
            _ => Err(expected("an integer")),
        },
        ParamType::Number => match &value {
            Value::Number(_) => Ok(value),
            _ => Err(expected("a number")),
        },
        ParamType::Boolean => match &value {
            Value::Bool(_) => Ok(value),
            _ => Err(expected("a boolean")),
        },
        ParamType::Date => {
            let valid = value.as_str().is_some_and(|text| {
                text.len() == 10
                    && text
                        .bytes()
                        .enumerate()
                        .all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() })
                    && chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok()
            });
            if valid { Ok(value) } else { Err(expected("a date (YYYY-MM-DD)")) }
        }
        ParamType::Datetime => value
            .as_str()
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
            .map(|instant| Value::String(instant.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)))
            .ok_or_else(|| expected("a datetime (RFC 3339, e.g. 2026-11-22T02:00:00Z)")),
        ParamType::Enum => match &value {
            Value::String(text) if spec.values.iter().any(|v| v == text) => Ok(value),
            _ => Err(expected(&format!("one of {}", spec.values.join(", ")))),
        },
    }
}

/// A value as an error message names it (long texts cut).
fn describe(value: &Value) -> String {
    match value {
        Value::String(text) => format!("the string {}", short(text)),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// A text quoted, cut after 40 characters.
fn short(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{:?}...", &text[..at]),
        None => format!("{text:?}"),
    }
}

/// Refuses params over [`MAX_PARAMS_BYTES`] of JSON.
pub fn check_size(params: &Params) -> Result<(), String> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, params).map_err(|e| format!("params: {e}"))?;
    if count.0 > MAX_PARAMS_BYTES {
        return Err(format!(
            "params are {} bytes of JSON; a run's params may be at most {MAX_PARAMS_BYTES} bytes (64 KiB)",
            count.0
        ));
    }
    Ok(())
}

/// Refuses what no run's params may hold, whatever the DAG declares: more than
/// [`MAX_PARAMS_BYTES`] of JSON, a NUL byte in any string (a value or a key, at any depth: no
/// environment variable or argument can carry one, so the try could only fail), and two names
/// that map to the same `DAGMQ_PARAM_` variable (`a-b` and `a_b`: one would silently hide the
/// other).
pub fn check_run_params(params: &Params) -> Result<(), String> {
    check_size(params)?;
    let mut variables: BTreeMap<String, &String> = BTreeMap::new();
    for (name, value) in params {
        check_no_nul(value).map_err(|reason| format!("param {name:?}: {reason}"))?;
        let variable = param_env_name(name);
        if let Some(first) = variables.insert(variable.clone(), name) {
            return Err(format!("params {first:?} and {name:?} would both be ${variable}; give one another name"));
        }
    }
    Ok(())
}

/// Refuses a value with a NUL byte in any of its strings.
pub(super) fn check_no_nul(value: &Value) -> Result<(), String> {
    let has_nul = |text: &str| text.contains('\0');
    let found = match value {
        Value::String(text) => has_nul(text),
        Value::Array(items) => return items.iter().try_for_each(check_no_nul),
        Value::Object(fields) => {
            if fields.keys().any(|key| has_nul(key)) {
                true
            } else {
                return fields.values().try_for_each(check_no_nul);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    };
    if found {
        Err("holds a NUL byte, which no environment variable or argument can carry".to_string())
    } else {
        Ok(())
    }
}

/// The JSON value of `--param NAME=TEXT` for a param of type `kind` (`None`: undeclared or
/// untyped, taken as a string): an integer, number or boolean is parsed from the text, the
/// other types stay text (and are checked by the scheduler).
pub fn value_from_text(kind: Option<ParamType>, text: &str) -> Result<Value, String> {
    let got = || format!("got {text:?}");
    match kind {
        Some(ParamType::Integer) => text
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| text.parse::<u64>().map(Value::from))
            .map_err(|_| format!("expected an integer, {}", got())),
        Some(ParamType::Number) => text
            .parse::<i64>()
            .map(Value::from)
            .ok()
            .or_else(|| text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number))
            .ok_or_else(|| format!("expected a number, {}", got())),
        Some(ParamType::Boolean) => match text {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(format!("expected a boolean (true or false), {}", got())),
        },
        _ => Ok(Value::String(text.to_string())),
    }
}

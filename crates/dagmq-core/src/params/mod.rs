//! Run parameters: the schema a DAG declares for them (`[params.NAME]` tables in a DAG file,
//! [`crate::DagBuilder::param`] in Rust), and the checks every run's params pass.
//!
//! A param is *typed* (`string`, `integer`, `number`, `boolean`, `date`, `datetime`, `enum`) or
//! *untyped* (a plain `[params] NAME = value` default, or a `[params.NAME]` table without
//! `type`: any JSON value). A DAG that declares at least one `[params.NAME]` table refuses
//! params it does not list; a DAG with plain defaults only takes any params, as before.
//!
//! Values from outside are checked strictly by their JSON type (the API and the trigger queue
//! send JSON: `"3"` is not an integer); the CLI converts `--param KEY=VALUE` text by the schema
//! first ([`value_from_text`]). Typed values are normalised: a datetime is written back in
//! RFC 3339 (`Z` for UTC), so its text holds digits, `-`, `:`, `T`, `Z`, `+` and `.` only.
//!
//! Only values whose type makes their text a plain word may be templated into a command
//! ([`ParamType::safe_in_command`]); everything else reaches a process through its environment.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use regex_automata::dfa::Automaton;
use regex_automata::dfa::dense;
use regex_automata::nfa::thompson;
use regex_automata::util::syntax;
use serde_json::Value;

use crate::task::Params;

mod env;
mod value;

pub use env::{CODE_ENV_NAMES, CODE_ENV_PREFIXES, check_env_name, code_env_name, param_env_name};
use value::{check_no_nul, check_value};
pub use value::{check_plain_word, check_run_params, check_size, value_from_text};

/// The most a run's params may take, as JSON, in bytes (64 KiB), whatever the DAG declares.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;

/// The values dagmq makes itself, which any command may template: `{{ run_id }}` and so on.
pub const DAGMQ_VALUES: &[&str] = &["run_id", "dag_id", "task_id", "try", "logical_date", "ds"];

/// The type of a declared param.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// Any text, limited by `pattern` and `max_length`.
    String,
    /// A JSON integer (64 bits).
    Integer,
    /// A JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A calendar date as `YYYY-MM-DD`.
    Date,
    /// An RFC 3339 instant with its offset, e.g. `2026-11-22T02:00:00Z`.
    Datetime,
    /// One of the declared `values`, each a plain word.
    Enum,
}

impl ParamType {
    /// Every type, in the order the docs list them.
    pub const ALL: [ParamType; 7] = [
        ParamType::String,
        ParamType::Integer,
        ParamType::Number,
        ParamType::Boolean,
        ParamType::Date,
        ParamType::Datetime,
        ParamType::Enum,
    ];

    /// The name a DAG file uses.
    pub fn name(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::Date => "date",
            ParamType::Datetime => "datetime",
            ParamType::Enum => "enum",
        }
    }

    /// The type named `name`.
    pub fn parse(name: &str) -> Result<ParamType, String> {
        ParamType::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            let all: Vec<&str> = ParamType::ALL.iter().map(|t| t.name()).collect();
            format!("unknown type {name:?} (one of {})", all.join(", "))
        })
    }

    /// Whether a value of this type may be templated into a command: its text (once checked
    /// and normalised) is a plain word that no shell or program parses as code. Only `string`
    /// is not.
    pub fn safe_in_command(self) -> bool {
        self != ParamType::String
    }
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One declared param: its type and what values it takes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamSpec {
    /// The type; `None` for an untyped param (any JSON value, never templated into a command).
    pub kind: Option<ParamType>,
    /// The value a run gets when its trigger gives none.
    pub default: Option<Value>,
    /// For `enum`: the values allowed, each a plain word.
    pub values: Vec<String>,
    /// For `string`: a regular expression the whole value must match.
    pub pattern: Option<String>,
    /// For `string`: the most characters the value may have.
    pub max_length: Option<usize>,
    /// A trigger must give a value (refused with a default, which makes it never missing).
    pub required: bool,
    /// Free text for people (the UI shows it by the field).
    pub description: String,
    /// Written as a plain `[params] NAME = value` default: untyped, and it does not make the
    /// DAG refuse params it does not list.
    pub plain: bool,
}

impl ParamSpec {
    /// A param of type `kind`.
    pub fn typed(kind: ParamType) -> ParamSpec {
        ParamSpec { kind: Some(kind), ..ParamSpec::default() }
    }

    /// An untyped param: any JSON value; it may reach a task through `env`, never `command`.
    pub fn untyped() -> ParamSpec {
        ParamSpec::default()
    }

    /// A plain default, as `[params] NAME = value` writes it: untyped, and the DAG keeps taking
    /// params it does not list.
    pub fn plain(default: Value) -> ParamSpec {
        ParamSpec { default: Some(default), plain: true, ..ParamSpec::default() }
    }

    /// An `enum` param taking one of `values`.
    pub fn one_of<S: Into<String>>(values: impl IntoIterator<Item = S>) -> ParamSpec {
        ParamSpec { values: values.into_iter().map(Into::into).collect(), ..ParamSpec::typed(ParamType::Enum) }
    }

    /// Sets the default.
    pub fn default_value(mut self, value: Value) -> ParamSpec {
        self.default = Some(value);
        self
    }

    /// Makes a value required of every trigger.
    pub fn required(mut self) -> ParamSpec {
        self.required = true;
        self
    }

    /// For a `string`: a regular expression the whole value must match.
    pub fn pattern(mut self, pattern: impl Into<String>) -> ParamSpec {
        self.pattern = Some(pattern.into());
        self
    }

    /// For a `string`: the most characters it may have.
    pub fn max_length(mut self, max: usize) -> ParamSpec {
        self.max_length = Some(max);
        self
    }

    /// Free text for people.
    pub fn description(mut self, text: impl Into<String>) -> ParamSpec {
        self.description = text.into();
        self
    }

    /// Whether this param may be templated into a command.
    pub fn safe_in_command(&self) -> bool {
        self.kind.is_some_and(ParamType::safe_in_command)
    }
}

/// A `pattern`, compiled: a DFA over the bytes of a value, matched against the whole value.
///
/// Patterns use the regular expression syntax of the `regex` family (via `regex-automata`,
/// which dagmq already builds for its log filter), without Unicode classes: `\d`, `\w`, `\s`
/// and `[[:alpha:]]` are ASCII, and `.` matches one byte. The whole value must match (the
/// pattern is anchored at both ends). Patterns that would need a DFA over 1 MiB are refused.
#[derive(Clone)]
pub struct Pattern {
    text: String,
    dfa: Arc<dense::DFA<Vec<u32>>>,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.text).finish()
    }
}

/// The most memory a pattern's automaton may take while built and once built.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    /// Compiles `text`; the error says what is wrong with it.
    pub fn new(text: &str) -> Result<Pattern, String> {
        let syntax_config = syntax::Config::new().unicode(false).utf8(false);
        // Parsed alone first: its own syntax error, and no way for the text to close the group
        // it is wrapped in below.
        syntax::parse_with(text, &syntax_config).map_err(|e| {
            let message = e.to_string();
            let last = message.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            format!("bad pattern {text:?}: {}", last.strip_prefix("error: ").unwrap_or(last))
        })?;
        let dfa = dense::Builder::new()
            .syntax(syntax_config)
            .thompson(thompson::Config::new().utf8(false).nfa_size_limit(Some(PATTERN_SIZE_LIMIT)))
            .configure(
                dense::Config::new()
                    .dfa_size_limit(Some(PATTERN_SIZE_LIMIT))
                    .determinize_size_limit(Some(PATTERN_SIZE_LIMIT)),
            )
            .build(&format!("^(?:{text})$"))
            .map_err(|e| {
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(inner) = source {
                    message.push_str(&format!(": {inner}"));
                    source = inner.source();
                }
                format!("bad pattern {text:?}: {message}")
            })?;
        Ok(Pattern { text: text.to_string(), dfa: Arc::new(dfa) })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether all of `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        matches!(self.dfa.try_search_fwd(&regex_automata::Input::new(value)), Ok(Some(_)))
    }
}

/// The params a DAG declares, by name.
#[derive(Debug, Clone, Default)]
pub struct ParamsSchema {
    specs: BTreeMap<String, ParamSpec>,
    /// The compiled `pattern` of each string param that has one (made by [`Self::validate`]).
    patterns: BTreeMap<String, Pattern>,
    /// The params a command templates at the start of a word, with the first task that does
    /// ([`Self::set_word_starts`]): a value of theirs may not start with `-`.
    word_starts: BTreeMap<String, String>,
}

/// A schema that is wrong: which param, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// The param.
    pub param: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "param {:?}: {}", self.param, self.reason)
    }
}

impl ParamsSchema {
    /// No params declared.
    pub fn new() -> ParamsSchema {
        ParamsSchema::default()
    }

    /// Declares (or replaces) a param.
    pub fn insert(&mut self, name: impl Into<String>, spec: ParamSpec) {
        let name = name.into();
        self.patterns.remove(&name);
        self.specs.insert(name, spec);
    }

    /// The param named `name`.
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.get(name)
    }

    /// Every param, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &ParamSpec)> {
        self.specs.iter()
    }

    /// Whether nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Whether the DAG declares a schema (a param other than a plain default), so that it
    /// refuses params it does not list.
    pub fn declared(&self) -> bool {
        self.specs.values().any(|spec| !spec.plain)
    }

    /// Checks the schema itself, compiling patterns: names, types and their settings, defaults
    /// of the right type, enum values that are plain words, patterns that compile.
    pub fn validate(&mut self) -> Result<(), SchemaError> {
        let mut patterns = BTreeMap::new();
        for (name, spec) in &mut self.specs {
            let error = |reason: String| SchemaError { param: name.clone(), reason };
            if !spec.plain {
                check_param_name(name).map_err(error)?;
            }
            let is = |kind: ParamType| spec.kind == Some(kind);
            if !spec.values.is_empty() && !is(ParamType::Enum) {
                return Err(error("`values` is only for type = \"enum\"".to_string()));
            }
            if is(ParamType::Enum) {
                if spec.values.is_empty() {
                    return Err(error("type = \"enum\" needs `values = [\"...\", ...]`".to_string()));
                }
                for value in &spec.values {
                    check_plain_word(value).map_err(|reason| error(format!("enum value {value:?}: {reason}")))?;
                }
            }
            if (spec.pattern.is_some() || spec.max_length.is_some()) && !is(ParamType::String) {
                return Err(error("`pattern` and `max_length` are only for type = \"string\"".to_string()));
            }
            if let Some(pattern) = &spec.pattern {
                patterns.insert(name.clone(), Pattern::new(pattern).map_err(error)?);
            }
            if spec.required && spec.default.is_some() {
                return Err(error(
                    "has both `required = true` and a `default` (a default means it is never missing): give one"
                        .to_string(),
                ));
            }
            if let Some(default) = spec.default.take() {
                let checked = check_value(spec, patterns.get(name), default)
                    .map_err(|reason| error(format!("default: {reason}")))?;
                spec.default = Some(checked);
            }
        }
        self.patterns = patterns;
        let mut variables: BTreeMap<String, &String> = BTreeMap::new();
        for name in self.specs.keys() {
            let variable = param_env_name(name);
            if let Some(first) = variables.insert(variable.clone(), name) {
                return Err(SchemaError {
                    param: name.clone(),
                    reason: format!("would be ${variable}, as param {first:?} is; give one another name"),
                });
            }
        }
        for (name, spec) in &self.specs {
            if let Some(default) = &spec.default {
                check_no_nul(default)
                    .map_err(|reason| SchemaError { param: name.clone(), reason: format!("default: {reason}") })?;
            }
        }
        let defaults = self.defaults();
        check_size(&defaults).map_err(|reason| SchemaError { param: "*".to_string(), reason })?;
        Ok(())
    }

    /// The defaults of the params that have one.
    pub fn defaults(&self) -> Params {
        self.specs.iter().filter_map(|(name, spec)| Some((name.clone(), spec.default.clone()?))).collect()
    }

    /// The params of a run triggered with `given`: each given value checked against its
    /// param's type (and normalised), defaults for the params not given, a refusal for a
    /// required param not given and, when the DAG declares a schema, for a param it does not
    /// list. The error names the param and what was expected.
    pub fn resolve(&self, given: Params) -> Result<Params, String> {
        let declared = self.declared();
        let mut resolved = Params::new();
        for (name, value) in given {
            match self.specs.get(&name) {
                Some(spec) => {
                    let value = check_value(spec, self.patterns.get(&name), value)
                        .map_err(|reason| format!("param {name:?}: {reason}"))?;
                    self.check_word_start(&name, &value).map_err(|reason| format!("param {name:?}: {reason}"))?;
                    resolved.insert(name, value);
                }
                None if declared => {
                    let known: Vec<&str> = self.specs.keys().map(String::as_str).collect();
                    return Err(format!("unknown param {name:?} (this dag declares: {})", known.join(", ")));
                }
                None => {
                    resolved.insert(name, value);
                }
            }
        }
        for (name, spec) in &self.specs {
            if resolved.contains_key(name) {
                continue;
            }
            if let Some(default) = &spec.default {
                resolved.insert(name.clone(), default.clone());
            } else if spec.required {
                return Err(format!("param {name:?} is required and has no default"));
            }
        }
        check_run_params(&resolved)?;
        Ok(resolved)
    }

    /// `value` checked as a value of param `name` and normalised; a param the schema does not
    /// declare is refused.
    pub fn check(&self, name: &str, value: Value) -> Result<Value, String> {
        let spec = self.specs.get(name).ok_or_else(|| format!("param {name:?} is not declared"))?;
        let value = check_value(spec, self.patterns.get(name), value)
            .and_then(|value| self.check_word_start(name, &value).map(|()| value))
            .map_err(|reason| format!("param {name:?}: {reason}"))?;
        Ok(value)
    }

    /// Records which params a command templates at the start of a word (`param` to the first
    /// task that does), and checks their defaults: there, a value starting with `-` (a negative
    /// number) would be read as an option (`tail {{ params.n }}` with `-1` runs `tail -1`), so
    /// such a value is refused at trigger, and such a default at load.
    pub fn set_word_starts(&mut self, word_starts: BTreeMap<String, String>) -> Result<(), SchemaError> {
        self.word_starts = word_starts;
        for (name, spec) in &self.specs {
            if let Some(default) = &spec.default {
                self.check_word_start(name, default)
                    .map_err(|reason| SchemaError { param: name.clone(), reason: format!("default: {reason}") })?;
            }
        }
        Ok(())
    }

    /// Refuses a value starting with `-` for a param a command templates at a word's start.
    fn check_word_start(&self, name: &str, value: &Value) -> Result<(), String> {
        let Some(task) = self.word_starts.get(name) else { return Ok(()) };
        let text = crate::task::param_text(value);
        if !text.starts_with('-') {
            return Ok(());
        }
        Err(format!(
            "{text} starts with '-', and task {task:?} templates {{{{ params.{name} }}}} at the start of a command \
             argument, where a program would read it as an option; write it after the option it belongs to \
             (`--{name}={{{{ params.{name} }}}}`), put `--` before it, or pass it through `env`"
        ))
    }
}

/// A declared param's name: letters, digits, `_` and `-` (it becomes `{{ params.NAME }}` and
/// `DAGMQ_PARAM_NAME`).
fn check_param_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err("a param name is 1 to 200 characters".to_string());
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))) {
        return Err(format!("the name contains {bad:?}; use letters, digits, '_' and '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema(specs: &[(&str, ParamSpec)]) -> ParamsSchema {
        let mut schema = ParamsSchema::new();
        for (name, spec) in specs {
            schema.insert(*name, spec.clone());
        }
        schema
    }

    fn valid(specs: &[(&str, ParamSpec)]) -> ParamsSchema {
        let mut schema = schema(specs);
        schema.validate().unwrap();
        schema
    }

    fn refused(specs: &[(&str, ParamSpec)]) -> String {
        schema(specs).validate().unwrap_err().to_string()
    }

    #[test]
    fn bad_schemas_are_refused_with_the_param_and_the_reason() {
        let s = ParamSpec::typed;
        assert_eq!(
            refused(&[("n", s(ParamType::Integer).default_value(json!("x")))]),
            "param \"n\": default: expected an integer, got the string \"x\""
        );
        assert_eq!(
            refused(&[("d", s(ParamType::Date).default_value(json!("2026-13-01")))]),
            "param \"d\": default: expected a date (YYYY-MM-DD), got the string \"2026-13-01\""
        );
        assert_eq!(
            refused(&[("e", ParamSpec::one_of(["ok", "x; rm -rf /"]))]),
            "param \"e\": enum value \"x; rm -rf /\": not a plain word: it contains ';' (use letters, digits, '_', '-' \
             and '.')"
        );
        assert_eq!(
            refused(&[("e", ParamSpec::one_of(["--upload-pack=x"]))]),
            "param \"e\": enum value \"--upload-pack=x\": not a plain word: it starts with '-' or '.'"
        );
        assert_eq!(
            refused(&[("e", ParamSpec::typed(ParamType::Enum))]),
            "param \"e\": type = \"enum\" needs `values = [\"...\", ...]`"
        );
        assert_eq!(
            refused(&[("e", ParamSpec::one_of(["a"]).default_value(json!("b")))]),
            "param \"e\": default: expected one of a, got the string \"b\""
        );
        assert_eq!(
            refused(&[("s", s(ParamType::String).pattern("a)(b"))]),
            "param \"s\": bad pattern \"a)(b\": unopened group"
        );
        assert_eq!(
            refused(&[("n", s(ParamType::Integer).pattern("[0-9]+"))]),
            "param \"n\": `pattern` and `max_length` are only for type = \"string\""
        );
        assert_eq!(
            refused(&[("n", s(ParamType::Integer).required().default_value(json!(1)))]),
            "param \"n\": has both `required = true` and a `default` (a default means it is never missing): give one"
        );
        assert_eq!(
            refused(&[("a b", s(ParamType::Integer))]),
            "param \"a b\": the name contains ' '; use letters, digits, '_' and '-'"
        );
        assert_eq!(
            refused(&[("s", s(ParamType::String).max_length(3).default_value(json!("abcd")))]),
            "param \"s\": default: longer than 3 characters (4)"
        );
        assert!(refused(&[("s", s(ParamType::String).pattern("[ab]*a[ab]{24}"))]).contains("bad pattern"));
        assert_eq!(
            ParamType::parse("int").unwrap_err(),
            "unknown type \"int\" (one of string, integer, number, boolean, date, datetime, enum)"
        );
    }

    #[test]
    fn triggers_are_checked_normalised_and_get_defaults() {
        let schema = valid(&[
            ("n", ParamSpec::typed(ParamType::Integer).required()),
            ("x", ParamSpec::typed(ParamType::Number).default_value(json!(0.5))),
            ("b", ParamSpec::typed(ParamType::Boolean).default_value(json!(false))),
            ("d", ParamSpec::typed(ParamType::Date)),
            ("t", ParamSpec::typed(ParamType::Datetime)),
            ("m", ParamSpec::one_of(["fast", "slow"]).default_value(json!("fast"))),
            ("s", ParamSpec::typed(ParamType::String).pattern(r"[a-z]+\d?").max_length(5)),
            ("who", ParamSpec::plain(json!("world"))),
            ("any", ParamSpec::untyped()),
        ]);
        let params = |value: Value| -> Params { serde_json::from_value(value).unwrap() };
        let resolved = schema.resolve(params(json!({"n": 3, "t": "2026-11-22T03:00:00+01:00", "any": {"k": [1]}})));
        assert_eq!(
            resolved.unwrap(),
            params(json!({"n": 3, "x": 0.5, "b": false, "t": "2026-11-22T03:00:00+01:00", "m": "fast",
                "who": "world", "any": {"k": [1]}}))
        );
        assert_eq!(
            schema.resolve(params(json!({"n": 1, "t": "2026-11-22t02:00:00.000z"}))).unwrap()["t"],
            json!("2026-11-22T02:00:00Z")
        );
        for (given, error) in [
            (json!({}), "param \"n\" is required and has no default"),
            (json!({"n": "3"}), "param \"n\": expected an integer, got the string \"3\""),
            (json!({"n": 3.0}), "param \"n\": expected an integer, got 3.0"),
            (json!({"n": 1, "x": "1"}), "param \"x\": expected a number, got the string \"1\""),
            (json!({"n": 1, "b": 1}), "param \"b\": expected a boolean, got 1"),
            (
                json!({"n": 1, "d": "2026-1-05"}),
                "param \"d\": expected a date (YYYY-MM-DD), got the string \"2026-1-05\"",
            ),
            (
                json!({"n": 1, "d": "2026-02-29"}),
                "param \"d\": expected a date (YYYY-MM-DD), got the string \"2026-02-29\"",
            ),
            (
                json!({"n": 1, "t": "2026-11-22 02:00"}),
                "param \"t\": expected a datetime (RFC 3339, e.g. 2026-11-22T02:00:00Z), got the string \"2026-11-22 02:00\"",
            ),
            (json!({"n": 1, "m": "turbo"}), "param \"m\": expected one of fast, slow, got the string \"turbo\""),
            (json!({"n": 1, "m": null}), "param \"m\": expected one of fast, slow, got null"),
            (json!({"n": 1, "s": "abc12"}), "param \"s\": \"abc12\" does not match the pattern [a-z]+\\d?"),
            (json!({"n": 1, "s": "ab; x"}), "param \"s\": \"ab; x\" does not match the pattern [a-z]+\\d?"),
            (json!({"n": 1, "s": "abcdef"}), "param \"s\": longer than 5 characters (6)"),
            (json!({"n": 1, "s": ["a"]}), "param \"s\": expected a string, got a list"),
            (json!({"n": 1, "zz": 1}), "unknown param \"zz\" (this dag declares: any, b, d, m, n, s, t, who, x)"),
        ] {
            assert_eq!(schema.resolve(params(given.clone())).unwrap_err(), error, "{given}");
        }
        assert_eq!(schema.resolve(params(json!({"n": 1, "s": "abc1"}))).unwrap()["s"], json!("abc1"));
        let long = "y".repeat(100);
        assert_eq!(
            schema.resolve(params(json!({"n": long}))).unwrap_err(),
            format!("param \"n\": expected an integer, got the string \"{}\"...", "y".repeat(40))
        );
    }

    #[test]
    fn plain_defaults_alone_keep_taking_any_params() {
        let schema = valid(&[("date", ParamSpec::plain(json!("1970-01-01")))]);
        assert!(!schema.declared());
        let resolved = schema.resolve([("other".to_string(), json!(5))].into()).unwrap();
        assert_eq!(resolved, [("date".to_string(), json!("1970-01-01")), ("other".to_string(), json!(5))].into());
        assert!(
            valid(&[("date", ParamSpec::plain(json!("x"))), ("n", ParamSpec::typed(ParamType::Integer))]).declared()
        );
    }

    #[test]
    fn the_size_of_a_runs_params_is_capped() {
        let fits: Params = [("v".to_string(), json!("x".repeat(MAX_PARAMS_BYTES - 10)))].into();
        check_size(&fits).unwrap();
        let over: Params = [("v".to_string(), json!("x".repeat(MAX_PARAMS_BYTES)))].into();
        assert_eq!(
            check_size(&over).unwrap_err(),
            format!(
                "params are {} bytes of JSON; a run's params may be at most 65536 bytes (64 KiB)",
                MAX_PARAMS_BYTES + 8
            )
        );
        let mut too_big_defaults = schema(&[("v", ParamSpec::plain(json!("x".repeat(MAX_PARAMS_BYTES))))]);
        assert!(too_big_defaults.validate().unwrap_err().reason.contains("at most 65536 bytes"));
    }

    #[test]
    fn nul_bytes_and_params_sharing_a_variable_are_refused() {
        let params = |value: Value| -> Params { serde_json::from_value(value).unwrap() };
        check_run_params(&params(json!({"a": "x", "b": {"k": ["y"]}, "a-c": 1}))).unwrap();
        for (given, error) in [
            (
                json!({"s": "a\0b"}),
                "param \"s\": holds a NUL byte, which no environment variable or argument can carry",
            ),
            (
                json!({"o": {"k": [1, "\0"]}}),
                "param \"o\": holds a NUL byte, which no environment variable or argument can carry",
            ),
            (
                json!({"o": {"k\0": 1}}),
                "param \"o\": holds a NUL byte, which no environment variable or argument can carry",
            ),
            (
                json!({"a-b": "1", "a_b": "2"}),
                "params \"a-b\" and \"a_b\" would both be $DAGMQ_PARAM_A_B; give one another name",
            ),
            (
                json!({"x.y": 1, "X_Y": 2}),
                "params \"X_Y\" and \"x.y\" would both be $DAGMQ_PARAM_X_Y; give one another name",
            ),
        ] {
            assert_eq!(check_run_params(&params(given.clone())).unwrap_err(), error, "{given}");
        }
        // A trigger and a schema's defaults alike.
        let schema = valid(&[("a", ParamSpec::typed(ParamType::String))]);
        assert_eq!(
            schema.resolve(params(json!({"a": "\0"}))).unwrap_err(),
            "param \"a\": holds a NUL byte, which no environment variable or argument can carry"
        );
        let plain = valid(&[("a-b", ParamSpec::plain(json!("1")))]);
        assert_eq!(
            plain.resolve(params(json!({"a_b": "2"}))).unwrap_err(),
            "params \"a-b\" and \"a_b\" would both be $DAGMQ_PARAM_A_B; give one another name"
        );
        assert_eq!(
            refused(&[("a-b", ParamSpec::typed(ParamType::Integer)), ("a_b", ParamSpec::typed(ParamType::Integer))]),
            "param \"a_b\": would be $DAGMQ_PARAM_A_B, as param \"a-b\" is; give one another name"
        );
        assert_eq!(
            refused(&[("A_B", ParamSpec::plain(json!(1))), ("a-b", ParamSpec::typed(ParamType::Integer))]),
            "param \"a-b\": would be $DAGMQ_PARAM_A_B, as param \"A_B\" is; give one another name"
        );
        assert_eq!(
            refused(&[("s", ParamSpec::plain(json!("a\0")))]),
            "param \"s\": default: holds a NUL byte, which no environment variable or argument can carry"
        );
    }

    #[test]
    fn patterns_match_the_whole_value() {
        let p = Pattern::new(r"[a-z]+|\d{2}").unwrap();
        assert!(p.matches("abc") && p.matches("42"));
        assert!(!p.matches("abc1") && !p.matches("1") && !p.matches("") && !p.matches("a\nb"));
        let any = Pattern::new("(?i)ab.*").unwrap();
        assert!(any.matches("AB") && any.matches("abé"));
        assert!(Pattern::new("é+").unwrap().matches("éé"));
    }

    #[test]
    fn cli_text_becomes_the_schemas_json_type() {
        assert_eq!(value_from_text(Some(ParamType::Integer), "3"), Ok(json!(3)));
        assert_eq!(value_from_text(Some(ParamType::Integer), "-3"), Ok(json!(-3)));
        assert_eq!(
            value_from_text(Some(ParamType::Integer), "3.5"),
            Err("expected an integer, got \"3.5\"".to_string())
        );
        assert_eq!(value_from_text(Some(ParamType::Number), "2"), Ok(json!(2)));
        assert_eq!(value_from_text(Some(ParamType::Number), "2.5"), Ok(json!(2.5)));
        assert_eq!(value_from_text(Some(ParamType::Number), "NaN"), Err("expected a number, got \"NaN\"".to_string()));
        assert_eq!(value_from_text(Some(ParamType::Boolean), "true"), Ok(json!(true)));
        assert!(value_from_text(Some(ParamType::Boolean), "yes").unwrap_err().contains("true or false"));
        assert_eq!(value_from_text(Some(ParamType::Date), "2026-01-01"), Ok(json!("2026-01-01")));
        assert_eq!(value_from_text(None, "3"), Ok(json!("3")));
    }
}

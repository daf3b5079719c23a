//! `{{ params.KEY }}` and friends in command arguments and in a task's `env`.
//!
//! What may be templated where is decided at load ([`crate::dag`]): in `command` only values
//! whose text is a plain word (dagmq's own values, and params typed `integer`, `number`,
//! `boolean`, `date`, `datetime` or `enum`); anything else, from outside, goes through `env`.

use std::collections::BTreeMap;

/// Replaces every `{{ NAME }}` in `text` with `vars[NAME]`; an unknown name is an error.
/// Whitespace inside the braces is optional.
pub fn render(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    render_with(text, vars, str::to_string)
}

/// Renders the arguments of a command: a value substituted into the script of a shell
/// (`sh -c SCRIPT`, `bash -c`, `/bin/sh -ec`, `env sh -c` ...) is quoted as one shell word; in
/// any other argument it is substituted as is.
///
/// This quoting is a second layer only. It recognises shells by the shape of the command, and
/// the set of wrappers (`timeout`, `nice`, `su -c`, `ssh`, `python3 -c` ...) and of places in a
/// script (inside quotes, a heredoc, `eval`) is open, so it cannot be complete. What keeps
/// values from outside from becoming code is the load-time rule that only plain-word values
/// reach a command at all ([`crate::dag`]); the others reach the process through its
/// environment.
pub fn render_command(argv: &[String], vars: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let script = shell_script_index(argv);
    argv.iter()
        .enumerate()
        .map(|(i, arg)| if Some(i) == script { render_with(arg, vars, shell_word) } else { render(arg, vars) })
        .collect()
}

/// A value as one POSIX shell word: single-quoted, with each `'` written as `'\''`.
pub fn shell_word(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// The index of the script argument when `argv` runs a shell with `-c`.
pub fn shell_script_index(argv: &[String]) -> Option<usize> {
    const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "busybox"];
    let name = |arg: &str| arg.rsplit('/').next().unwrap_or(arg).to_string();
    let mut at = 0;
    // `env [-i] [NAME=VALUE]... sh -c ...`
    if argv.first().is_some_and(|p| name(p) == "env") {
        at = 1;
        while argv.get(at).is_some_and(|a| a.starts_with('-') || a.contains('=')) {
            at += 1;
        }
    }
    let program = name(argv.get(at)?);
    if !SHELLS.contains(&program.as_str()) {
        return None;
    }
    at += 1;
    if program == "busybox" && argv.get(at).is_some_and(|a| SHELLS.contains(&a.as_str())) {
        at += 1;
    }
    // Options before the script: the script is the argument after the cluster holding `c`
    // (`-c`, `-ec`, `-xc`, `-lc`), or after `-o NAME` pairs and other flags.
    let mut command_flag = false;
    while let Some(arg) = argv.get(at) {
        if arg == "--" || !arg.starts_with('-') || arg == "-" {
            break;
        }
        if arg == "-o" || arg == "+o" {
            at += 2;
            continue;
        }
        if !arg.starts_with("--") && arg.contains('c') {
            command_flag = true;
        }
        at += 1;
    }
    (command_flag && at < argv.len()).then_some(at)
}

/// The names of the placeholders in `text`, trimmed, in order; an unclosed `{{` is an error.
pub fn placeholders(text: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    for piece in pieces(text) {
        if let (_, Some(name)) = piece? {
            names.push(name);
        }
    }
    Ok(names)
}

/// The names of the placeholders in `text` that begin a word: at the start of the text, or
/// after a character that may end a word in some grammar (a space, a quote, `;`, `(` ...). A
/// value there that starts with `-` would be read as an option by the program that gets the
/// word. A placeholder after a letter, a digit or one of `_ = . , : / + @ % -` (`--n={{ n }}`,
/// `x{{ n }}`), or right after another placeholder, continues a word instead. Unclosed `{{`
/// ends the list (rendering refuses it).
pub fn word_start_placeholders(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut first = true;
    for piece in pieces(text) {
        let Ok((literal, Some(name))) = piece else { break };
        let joined = match literal.chars().last() {
            Some(c) => c.is_ascii_alphanumeric() || "_=.,:/+@%-".contains(c),
            None => !first,
        };
        if !joined {
            names.push(name);
        }
        first = false;
    }
    names
}

/// The task ids that `{{ tasks.ID.output... }}` names in `text`, in order of appearance (up to
/// an unclosed `{{`, which rendering refuses).
pub fn output_references(text: &str) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for piece in pieces(text) {
        let Ok((_, Some(name))) = piece else { continue };
        if let Some(id) = name.strip_prefix("tasks.").and_then(|tail| tail.split_once(".output").map(|(id, _)| id))
            && !ids.iter().any(|known| known == id)
        {
            ids.push(id.to_string());
        }
    }
    ids
}

/// Template variables for another task's output: `tasks.ID.output` (compact JSON; a string as
/// itself; `null` when the task handed nothing on), and for an object, each field and sub-field
/// as `tasks.ID.output.FIELD.SUB` (list items by index).
pub fn output_vars(task_id: &str, output: Option<&serde_json::Value>, vars: &mut BTreeMap<String, String>) {
    fn walk(prefix: String, value: &serde_json::Value, vars: &mut BTreeMap<String, String>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, field) in fields {
                    walk(format!("{prefix}.{key}"), field, vars);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(format!("{prefix}.{i}"), item, vars);
                }
            }
            _ => {}
        }
        vars.insert(prefix, crate::task::param_text(value));
    }
    walk(format!("tasks.{task_id}.output"), output.unwrap_or(&serde_json::Value::Null), vars);
}

/// [`render`] with each substituted value passed through `quote`.
pub fn render_with(
    text: &str,
    vars: &BTreeMap<String, String>,
    quote: impl Fn(&str) -> String,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for piece in pieces(text) {
        let (literal, name) = piece?;
        out.push_str(literal);
        let Some(name) = name else { continue };
        match vars.get(name) {
            Some(value) => out.push_str(&quote(value)),
            None => {
                let known: Vec<&str> = vars.keys().map(String::as_str).collect();
                return Err(format!("unknown template variable {name:?} (known: {})", known.join(", ")));
            }
        }
    }
    Ok(out)
}

/// `text` cut at its placeholders: each item is the text before a `{{ NAME }}` with the trimmed
/// name, and the last one the text after the last placeholder (no name). An unclosed `{{` is an
/// error, and the last item.
fn pieces(text: &str) -> impl Iterator<Item = Result<(&str, Option<&str>), String>> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest.take()?;
        let Some(open) = current.find("{{") else { return Some(Ok((current, None))) };
        let after_open = &current[open + 2..];
        let Some(close) = after_open.find("}}") else {
            return Some(Err(format!("unclosed '{{{{' in {text:?}")));
        };
        rest = Some(&after_open[close + 2..]);
        Some(Ok((&current[..open], Some(after_open[..close].trim()))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_references_and_variables() {
        assert_eq!(
            output_references("{{ tasks.a.output }} {{params.x}} {{tasks.b.output.path}} {{ tasks.a.output.n }}"),
            ["a", "b"]
        );
        let mut vars = BTreeMap::new();
        output_vars("a", Some(&serde_json::json!({"path": "/x", "n": 3, "list": ["p", {"q": true}]})), &mut vars);
        output_vars("s", Some(&serde_json::json!("plain")), &mut vars);
        output_vars("none", None, &mut vars);
        assert_eq!(vars["tasks.a.output"], r#"{"list":["p",{"q":true}],"n":3,"path":"/x"}"#);
        assert_eq!(vars["tasks.a.output.path"], "/x");
        assert_eq!(vars["tasks.a.output.n"], "3");
        assert_eq!(vars["tasks.a.output.list.1.q"], "true");
        assert_eq!(vars["tasks.s.output"], "plain");
        assert_eq!(vars["tasks.none.output"], "null");
        assert_eq!(render("wc -l {{ tasks.a.output.path }}", &vars).unwrap(), "wc -l /x");
        assert!(render("{{ tasks.a.output.missing }}", &vars).unwrap_err().contains("unknown template variable"));
    }

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn finds_the_script_of_a_shell() {
        for (words, at) in [
            (&["sh", "-c", "echo"][..], Some(2)),
            (&["/bin/bash", "-ec", "echo", "$0"][..], Some(2)),
            (&["bash", "-e", "-o", "pipefail", "-c", "echo"][..], Some(5)),
            (&["/usr/bin/env", "A=1", "sh", "-c", "echo"][..], Some(4)),
            (&["busybox", "sh", "-c", "echo"][..], Some(3)),
            (&["sh", "script.sh", "-c"][..], None),
            (&["sh", "-e"][..], None),
            (&["echo", "-c", "x"][..], None),
            (&["python3", "-c", "print(1)"][..], None),
        ] {
            assert_eq!(shell_script_index(&argv(words)), at, "{words:?}");
        }
    }

    #[test]
    fn values_in_a_shell_script_are_one_word_elsewhere_as_is() {
        let vars: BTreeMap<String, String> =
            [("params.v".to_string(), "x; id $(id) `id` 'q' \"d\"".to_string())].into();
        let rendered = render_command(&argv(&["sh", "-c", "echo {{ params.v }}", "{{ params.v }}"]), &vars).unwrap();
        assert_eq!(rendered[2], "echo 'x; id $(id) `id` '\\''q'\\'' \"d\"'");
        assert_eq!(rendered[3], "x; id $(id) `id` 'q' \"d\"");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }

    #[test]
    fn finds_placeholders_that_begin_a_word() {
        assert_eq!(word_start_placeholders("{{ params.n }}"), ["params.n"]);
        assert_eq!(word_start_placeholders("tail {{ params.n }} f"), ["params.n"]);
        assert_eq!(word_start_placeholders("echo '{{ a }}' \"{{b}}\";{{ c }}\t{{ d }}"), ["a", "b", "c", "d"]);
        assert!(word_start_placeholders("--n={{ params.n }}").is_empty());
        assert!(word_start_placeholders("x{{ a }}{{ b }} /tmp/{{ c }} 1,{{ d }} -{{ e }}").is_empty());
    }

    #[test]
    fn lists_placeholders() {
        assert_eq!(placeholders("a {{ x }} b {{y}}{{ tasks.t.output.p }}").unwrap(), ["x", "y", "tasks.t.output.p"]);
        assert_eq!(placeholders("none").unwrap(), Vec::<&str>::new());
        assert!(placeholders("{{ x }} {{ open").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn renders_and_refuses_unknown() {
        let vars: BTreeMap<String, String> =
            [("params.date", "2026-11-22"), ("run_id", "r1")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        assert_eq!(render("echo {{ params.date }} {{run_id}}", &vars).unwrap(), "echo 2026-11-22 r1");
        assert_eq!(render("no vars", &vars).unwrap(), "no vars");
        assert!(render("{{ params.nope }}", &vars).unwrap_err().contains("unknown template variable \"params.nope\""));
        assert!(render("{{ open", &vars).unwrap_err().contains("unclosed"));
    }
}

//! `{{ params.KEY }}` and friends in command arguments.

use std::collections::BTreeMap;

/// Replaces every `{{ NAME }}` in `text` with `vars[NAME]`; an unknown name is an error.
/// Whitespace inside the braces is optional.
pub fn render(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after_open = &rest[open + 2..];
        let Some(close) = after_open.find("}}") else {
            return Err(format!("unclosed '{{{{' in {text:?}"));
        };
        let name = after_open[..close].trim();
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => {
                let known: Vec<&str> = vars.keys().map(String::as_str).collect();
                return Err(format!("unknown template variable {name:?} (known: {})", known.join(", ")));
            }
        }
        rest = &after_open[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

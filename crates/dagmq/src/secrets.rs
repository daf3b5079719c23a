//! Secrets from the environment or from files, so that none has to be on a command line, where
//! `ps` shows it to every user of the machine.

use std::path::Path;

/// The value of the environment variable `name`, or the contents of the file named by
/// `name_FILE` (a mounted secret; one trailing newline dropped). Empty counts as unset; both
/// set is an error, as is a file that cannot be read.
pub(crate) fn env_secret(name: &str) -> Result<Option<String>, String> {
    let direct = std::env::var(name).ok().filter(|v| !v.is_empty());
    let file_var = format!("{name}_FILE");
    let file = std::env::var_os(&file_var).filter(|v| !v.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => Err(format!("set {name} or {file_var}, not both")),
        (Some(value), None) => Ok(Some(value)),
        (None, Some(path)) => read_secret(Path::new(&path), &file_var).map(Some),
        (None, None) => Ok(None),
    }
}

/// A URL given directly or in a file (`--amqp-file`); `what` names the flag for errors.
pub(crate) fn url_or_file(direct: Option<&str>, file: Option<&Path>, what: &str) -> Result<Option<String>, String> {
    match (direct, file) {
        (Some(url), _) => Ok(Some(url.to_string())),
        (None, Some(path)) => read_secret(path, what).map(Some),
        (None, None) => Ok(None),
    }
}

/// A secret file's contents without the trailing newline; an empty file is an error.
fn read_secret(path: &Path, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{what} {}: cannot read: {e}", path.display()))?;
    let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if value.is_empty() {
        return Err(format!("{what} {}: the file is empty", path.display()));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_urls_from_files() {
        let dir = std::env::temp_dir().join(format!("dagmq-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("amqp");
        std::fs::write(&path, "amqp://u:secret@h/%2f\n").unwrap();
        assert_eq!(url_or_file(None, Some(&path), "--amqp-file").unwrap().as_deref(), Some("amqp://u:secret@h/%2f"));
        assert_eq!(url_or_file(Some("amqp://x"), None, "--amqp-file").unwrap().as_deref(), Some("amqp://x"));
        assert_eq!(url_or_file(None, None, "--amqp-file").unwrap(), None);
        std::fs::write(&path, "").unwrap();
        assert!(url_or_file(None, Some(&path), "--amqp-file").unwrap_err().contains("is empty"));
        let missing = dir.join("missing");
        let err = url_or_file(None, Some(&missing), "--redis-file").unwrap_err();
        assert!(err.starts_with("--redis-file") && err.contains("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Environment variable names: the one that carries each param to a command, and the names
//! other programs read as code, which the task key `env` may set only to a literal.

/// The environment variable that carries param `name` to every command: `DAGMQ_PARAM_` and
/// the name in upper case, `_` for anything but letters and digits.
pub fn param_env_name(name: &str) -> String {
    let suffix: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("DAGMQ_PARAM_{suffix}")
}

/// Environment variables that programs other than the task's own read as code, as options,
/// or as a place to load code or configuration from: the dynamic loader (`LD_PRELOAD`), a shell
/// starting up (`BASH_ENV`, `ENV`, `PS4` under `-x`, `IFS`, `PATH`), an interpreter starting up
/// (`PYTHONSTARTUP`, `PERL5OPT`, `NODE_OPTIONS`, `JAVA_TOOL_OPTIONS`), git (`GIT_SSH_COMMAND`,
/// `GIT_CONFIG_*`), the C library (`GLIBC_TUNABLES`, `GCONV_PATH`), a program a tool starts for
/// the user (`PAGER`, `EDITOR`, `SHELL`, `CC`), or the directory a tool reads its startup files
/// from (`HOME`, `ZDOTDIR`, `XDG_CONFIG_HOME`). A value from outside put there may run as code
/// in any program of the task, even one that never looks at it, so the task key `env` may set
/// them only to a literal value, never to a template. Compared in upper case; see also
/// [`CODE_ENV_PREFIXES`].
pub const CODE_ENV_NAMES: &[&str] = &[
    // Shells.
    "ENV",
    "SHELLOPTS",
    "PS0",
    "PS1",
    "PS2",
    "PS3",
    "PS4",
    "PROMPT_COMMAND",
    "IFS",
    "CDPATH",
    "GLOBIGNORE",
    "FPATH",
    "INPUTRC",
    "ZDOTDIR",
    // Search paths and startup directories.
    "PATH",
    "HOME",
    "TMPDIR",
    "XDG_CONFIG_HOME",
    "XDG_CONFIG_DIRS",
    "CLASSPATH",
    // Interpreters' options.
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "GOFLAGS",
    "PHPRC",
    "PHP_INI_SCAN_DIR",
    // The C library.
    "GLIBC_TUNABLES",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RESOLV_HOST_CONF",
    // Programs a tool starts, and tools' options.
    "PAGER",
    "MANPAGER",
    "MANOPT",
    "EDITOR",
    "VISUAL",
    "BROWSER",
    "SHELL",
    "SSH_ASKPASS",
    "SUDO_ASKPASS",
    "RSYNC_RSH",
    "CVS_RSH",
    "TAR_OPTIONS",
    "MAKEFLAGS",
    "MFLAGS",
    "CC",
    "CXX",
    "RUSTC_WRAPPER",
    "OPENSSL_CONF",
    "KUBECONFIG",
];

/// Families of [`CODE_ENV_NAMES`], each a prefix and `*`: `LD_*` (`LD_PRELOAD`,
/// `LD_LIBRARY_PATH`, `LD_AUDIT`), `DYLD_*`, `BASH*` (`BASH_ENV`, `BASH_FUNC_*`, `BASHOPTS`),
/// `PYTHON*`, `PERL*` (`PERL5OPT`, `PERL5LIB`, `PERLLIB`), `RUBY*`, `NODE_*`, `JAVA_*`
/// (`JAVA_TOOL_OPTIONS`), `GIT_*`, `MALLOC_*`, `LESS*` (`LESSOPEN`) and `LUA_*` (`LUA_INIT`).
pub const CODE_ENV_PREFIXES: &[&str] = &[
    "LD_*", "DYLD_*", "BASH*", "PYTHON*", "PERL*", "RUBY*", "NODE_*", "JAVA_*", "GIT_*", "MALLOC_*", "LESS*", "LUA_*",
];

/// The entry of [`CODE_ENV_NAMES`] or [`CODE_ENV_PREFIXES`] that `name` falls under, compared
/// in upper case; `None` for a name of the task's own.
pub fn code_env_name(name: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    CODE_ENV_NAMES
        .iter()
        .find(|known| **known == upper)
        .or_else(|| CODE_ENV_PREFIXES.iter().find(|family| upper.starts_with(family.trim_end_matches('*'))))
        .copied()
}

/// A name for the task key `env`: letters, digits and `_`, not starting with a digit, and not
/// one of dagmq's own (`DAGMQ_...`, any case).
pub fn check_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name".to_string());
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(format!("name {name:?} contains {bad:?}; use letters, digits and '_'"));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("name {name:?} starts with a digit"));
    }
    if name.to_ascii_uppercase().starts_with("DAGMQ_") {
        return Err(format!("name {name:?}: names starting with DAGMQ_ are dagmq's own"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_that_other_programs_read_as_code_are_known_by_family() {
        // One or more of each family: the loader, the shells, interpreters' startup and option
        // variables, git, the C library, pagers and editors, home and temporary directories.
        for (name, entry) in [
            ("LD_PRELOAD", "LD_*"),
            ("LD_LIBRARY_PATH", "LD_*"),
            ("DYLD_INSERT_LIBRARIES", "DYLD_*"),
            ("BASH_ENV", "BASH*"),
            ("BASH_FUNC_echo%%", "BASH*"),
            ("ENV", "ENV"),
            ("SHELLOPTS", "SHELLOPTS"),
            ("BASHOPTS", "BASH*"),
            ("PS4", "PS4"),
            ("PS1", "PS1"),
            ("PROMPT_COMMAND", "PROMPT_COMMAND"),
            ("IFS", "IFS"),
            ("CDPATH", "CDPATH"),
            ("GLOBIGNORE", "GLOBIGNORE"),
            ("PATH", "PATH"),
            ("path", "PATH"),
            ("PYTHONSTARTUP", "PYTHON*"),
            ("PYTHONPATH", "PYTHON*"),
            ("PERL5OPT", "PERL*"),
            ("PERL5LIB", "PERL*"),
            ("PERLLIB", "PERL*"),
            ("RUBYOPT", "RUBY*"),
            ("RUBYLIB", "RUBY*"),
            ("NODE_OPTIONS", "NODE_*"),
            ("NODE_PATH", "NODE_*"),
            ("JAVA_TOOL_OPTIONS", "JAVA_*"),
            ("_JAVA_OPTIONS", "_JAVA_OPTIONS"),
            ("JDK_JAVA_OPTIONS", "JDK_JAVA_OPTIONS"),
            ("GIT_SSH_COMMAND", "GIT_*"),
            ("GIT_CONFIG_VALUE_0", "GIT_*"),
            ("GIT_EXEC_PATH", "GIT_*"),
            ("GLIBC_TUNABLES", "GLIBC_TUNABLES"),
            ("MALLOC_CHECK_", "MALLOC_*"),
            ("GCONV_PATH", "GCONV_PATH"),
            ("PAGER", "PAGER"),
            ("MANPAGER", "MANPAGER"),
            ("LESSOPEN", "LESS*"),
            ("EDITOR", "EDITOR"),
            ("VISUAL", "VISUAL"),
            ("SHELL", "SHELL"),
            ("ZDOTDIR", "ZDOTDIR"),
            ("HOME", "HOME"),
            ("XDG_CONFIG_HOME", "XDG_CONFIG_HOME"),
            ("TMPDIR", "TMPDIR"),
            ("TAR_OPTIONS", "TAR_OPTIONS"),
            ("MAKEFLAGS", "MAKEFLAGS"),
            ("CC", "CC"),
            ("OPENSSL_CONF", "OPENSSL_CONF"),
        ] {
            assert_eq!(code_env_name(name), Some(entry), "{name}");
        }
        for name in ["WHO", "DAY", "VALUE", "PATHNAME", "MY_PATH", "HOMEDIR", "NAME", "INPUT", "ENVIRONMENT"] {
            assert_eq!(code_env_name(name), None, "{name}");
        }
    }

    #[test]
    fn env_names() {
        assert_eq!(param_env_name("my-key.x"), "DAGMQ_PARAM_MY_KEY_X");
        check_env_name("PATH_2").unwrap();
        assert_eq!(check_env_name("").unwrap_err(), "an empty name");
        assert_eq!(check_env_name("A=B").unwrap_err(), "name \"A=B\" contains '='; use letters, digits and '_'");
        assert_eq!(check_env_name("2X").unwrap_err(), "name \"2X\" starts with a digit");
        assert_eq!(
            check_env_name("dagmq_run_id").unwrap_err(),
            "name \"dagmq_run_id\": names starting with DAGMQ_ are dagmq's own"
        );
    }
}

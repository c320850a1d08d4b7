//! Procfile parsing: `name: path/to/component.wasm [args…]` per line.
//!
//! Same rules as foreman: `#` comments and blank lines are ignored, names are
//! `[A-Za-z0-9_-]+`. CRLF line endings and a UTF-8 byte-order mark are accepted. Arguments are
//! split as foreman's shell splits them: on whitespace; single or double quotes group words
//! (`"hello world"`); a backslash escapes the next character outside quotes, and `"`, `\`,
//! `$` or `` ` `` inside double quotes (elsewhere it stays, as in `"a\b"`); nothing is special
//! inside single quotes; an unquoted `#` that begins a word starts a comment to the end of the
//! line (`web: app.wasm 8 # eight workers`). There is no variable expansion: guests get `$PORT`
//! in their environment, not in their arguments.

use crate::app::ProcessName;

/// One `name: command` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The process type.
    pub name: ProcessName,
    /// The component path as written (relative to the Procfile's directory unless absolute).
    pub component: String,
    /// Guest arguments after the program name.
    pub args: Vec<String>,
    /// 1-based line number, for later error messages.
    pub line: usize,
}

/// A parse error; the caller prefixes the file name.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Parses a whole Procfile.
pub fn parse(text: &str) -> Result<Vec<Entry>, Error> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut entries: Vec<Entry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let err = |message: String| Error { line, message };
        let content = raw.trim_end_matches('\r').trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let Some((name, command)) = content.split_once(':') else {
            return Err(err(format!(
                "expected `name: component.wasm [args…]`, found `{content}` (missing `:`)"
            )));
        };
        let name = ProcessName::new(name.trim()).map_err(err)?;
        let words = split_words(command).map_err(err)?;
        let Some((component, args)) = words.split_first() else {
            return Err(err(format!(
                "process type `{name}` has an empty command: give the path of a `.wasm` component"
            )));
        };
        if let Some(first) = entries.iter().find(|e| e.name == name) {
            return Err(err(format!(
                "duplicate process type `{name}` (first defined on line {})",
                first.line
            )));
        }
        entries.push(Entry {
            name,
            component: component.clone(),
            args: args.to_vec(),
            line,
        });
    }
    if entries.is_empty() {
        return Err(Error {
            line: 1,
            message: "no process types defined: add lines like `web: app.wasm`".to_string(),
        });
    }
    Ok(entries)
}

/// Splits a command as a POSIX shell splits words (see the module docs), without expansion.
pub(crate) fn split_words(command: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                let word = current.get_or_insert_default();
                match chars.next() {
                    Some(next @ ('"' | '\\' | '$' | '`')) => word.push(next),
                    Some(next) => {
                        word.push('\\');
                        word.push(next);
                    }
                    None => return Err(format!("unterminated \" quote in `{}`", command.trim())),
                }
            }
            (Some(_), c) => current.get_or_insert_default().push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                current.get_or_insert_default();
            }
            (None, '\\') => match chars.next() {
                Some(next) => current.get_or_insert_default().push(next),
                None => {
                    return Err(format!(
                        "a trailing `\\` escapes nothing in `{}`: remove it, or quote it ('\\')",
                        command.trim()
                    ));
                }
            },
            (None, '#') if current.is_none() => break,
            (None, c) if c.is_whitespace() => words.extend(current.take()),
            (None, c) => current.get_or_insert_default().push(c),
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote in `{}`", command.trim()));
    }
    words.extend(current);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_comments_crlf_and_bom() {
        let text = "\u{feff}# demo\r\nweb: hello.wasm\r\n\r\nworker:  ticker.wasm 500 'a b'\r\n";
        let entries = parse(text).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name.as_str(), "web");
        assert_eq!(entries[0].component, "hello.wasm");
        assert_eq!(entries[0].line, 2);
        assert_eq!(entries[1].args, vec!["500".to_string(), "a b".to_string()]);
        assert_eq!(entries[1].line, 4);
    }

    proptest::proptest! {
        /// Any input parses or is rejected with a line inside the text; never a panic.
        #[test]
        fn never_panics_and_errors_point_into_the_text(text in "\\PC{0,200}", lines in proptest::collection::vec("[a-z:# '\"\\r\t\u{feff}-]{0,20}", 0..8)) {
            for input in [text, lines.join("\n")] {
                if let Err(e) = parse(&input) {
                    proptest::prop_assert!(e.line >= 1 && e.line <= input.lines().count().max(1), "{e:?} for {input:?}");
                    proptest::prop_assert!(!e.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn words_split_as_foremans_shell_splits_them() {
        let words = |command: &str| split_words(command).unwrap();
        assert_eq!(words("a.wasm 8 # eight workers"), ["a.wasm", "8"]);
        assert_eq!(words("a.wasm x#y '#quoted'"), ["a.wasm", "x#y", "#quoted"]);
        assert_eq!(
            words(r#"a.wasm "say \"hi\"" 'it''s' "a\b""#),
            ["a.wasm", r#"say "hi""#, "its", r"a\b"]
        );
        assert_eq!(
            words(r"a.wasm one\ word \#not-a-comment"),
            ["a.wasm", "one word", "#not-a-comment"]
        );
        assert_eq!(words(r"a.wasm '\n stays'"), ["a.wasm", r"\n stays"]);
        let e = split_words(r"a.wasm oops\").unwrap_err();
        assert!(e.contains(r"a trailing `\` escapes nothing"), "{e}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("web: a.wasm\nnonsense\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("missing `:`"), "{}", e.message);

        let e = parse("web: a.wasm\nweb: b.wasm\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(
            e.message
                .contains("duplicate process type `web` (first defined on line 1)")
        );

        let e = parse("web:   \n").unwrap_err();
        assert!(e.message.contains("empty command"), "{}", e.message);

        let e = parse("we/b: a.wasm\n").unwrap_err();
        assert!(
            e.message.contains("invalid process type name `we/b`"),
            "{}",
            e.message
        );

        let e = parse("web: a.wasm 'oops\n").unwrap_err();
        assert!(e.message.contains("unterminated"), "{}", e.message);

        let e = parse("# only comments\n\n").unwrap_err();
        assert!(e.message.contains("no process types"), "{}", e.message);
    }
}

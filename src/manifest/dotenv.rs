//! `.env` files, read the way foreman and `heroku local` read them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result};

/// Loads a `.env` file the way foreman and `heroku local` do: `KEY=value` lines, `#` comments,
/// optional `export`, quotes.
pub(super) fn load_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    let iter = dotenvy::from_path_iter(path)
        .with_context(|| format!("failed to read `{}`", path.display()))?;
    for item in iter {
        let (key, value) = item.map_err(|e| match e {
            dotenvy::Error::LineParse(line, index) => {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let number = text
                    .lines()
                    .position(|l| l.contains(line.trim()))
                    .map_or(0, |n| n + 1);
                anyhow::anyhow!(
                    "{}:{number}: cannot parse `{}` at character {index}: expected `KEY=value`",
                    path.display(),
                    line.trim()
                )
            }
            other => anyhow::anyhow!("{}: {other}", path.display()),
        })?;
        env.insert(key, value);
    }
    Ok(env)
}

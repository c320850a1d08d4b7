//! The app's state directory (default `.wasmform/` next to the Procfile): the control socket
//! and the persisted formation.
//!
//! The directory is created mode 0700 and the socket is made 0600, so only the owner can steer
//! the host. State files are written atomically (temp file, fsync, rename, fsync of the
//! directory): a crash at any point leaves either the old or the new file, never half of one.
//! A file that does not parse is an error naming the file, never a silent reset.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::app::{ByteSize, ProcessName};
use crate::formation::{Formation, Scale};

/// Name of the state directory inside the app directory.
pub const DIR_NAME: &str = ".wasmform";

/// The state directory of one app.
#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
}

/// On-disk form of the formation.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredFormation {
    /// Format version, for later migrations.
    version: u32,
    /// Per type: count and memory limit in bytes.
    types: BTreeMap<String, StoredScale>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredScale {
    count: u32,
    memory: u64,
}

impl StateDir {
    /// The state directory at `path` (not created yet).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The default state directory of the app in `app_dir`: `.wasmform/` beside the Procfile.
    pub fn for_app(app_dir: &Path) -> Self {
        Self::new(app_dir.join(DIR_NAME))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory (0700) if needed and checks it is private.
    pub fn create(&self) -> Result<()> {
        match std::fs::DirBuilder::new().mode(0o700).create(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "failed to create the state directory `{}`",
                        self.path.display()
                    )
                });
            }
        }
        let meta = std::fs::symlink_metadata(&self.path)
            .with_context(|| format!("failed to inspect `{}`", self.path.display()))?;
        if !meta.is_dir() {
            bail!(
                "`{}` is not a directory: wasmform keeps its state there; move it away",
                self.path.display()
            );
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| {
                    format!("failed to make `{}` private (0700)", self.path.display())
                })?;
        }
        Ok(())
    }

    /// Path of the control socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    fn formation_file(&self) -> PathBuf {
        self.path.join("formation.json")
    }

    /// Loads the stored formation over `base` (types not in the app are reported in the
    /// returned list and ignored). `Ok(None)` when nothing is stored yet.
    pub fn load_formation(&self, base: &Formation) -> Result<Option<(Formation, Vec<String>)>> {
        let path = self.formation_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("failed to read `{}`", path.display()));
            }
        };
        let corrupt = |why: String| {
            anyhow::anyhow!(
                "the stored formation `{}` is corrupt ({why}): fix it, or delete it to start from the Procfile's formation",
                path.display()
            )
        };
        formation_from_json(&text, base).map(Some).map_err(corrupt)
    }

    /// Stores `formation` atomically.
    pub fn store_formation(&self, formation: &Formation) -> Result<()> {
        let mut text = formation_to_json(formation);
        text.push('\n');
        write_atomically(&self.formation_file(), text.as_bytes())
    }
}

/// Writes `bytes` to `path` so that readers (and a crash) see the old or the new content.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .expect("state files live in the state directory");
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("failed to write `{}`", path.display()))
}

/// A formation in its stored form (the state directory's `formation.json`, a cluster's
/// `formation` key in etcd): `{"version": 1, "types": {"web": {"count", "memory"}}}`.
pub(crate) fn formation_to_json(formation: &Formation) -> String {
    let stored = StoredFormation {
        version: 1,
        types: formation
            .iter()
            .map(|(name, scale)| {
                let scale = StoredScale {
                    count: scale.count,
                    memory: scale.memory.as_u64(),
                };
                (name.to_string(), scale)
            })
            .collect(),
    };
    serde_json::to_string_pretty(&stored).expect("formation serializes")
}

/// A stored formation over `base`, checked: the types `base` has take their stored scale,
/// the others are returned (a type no longer in the app, or one a newer release of another
/// node has). `Err`: why it is not a formation.
pub(crate) fn formation_from_json(
    text: &str,
    base: &Formation,
) -> Result<(Formation, Vec<String>), String> {
    let stored: StoredFormation = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if stored.version != 1 {
        return Err(format!("unknown version {}", stored.version));
    }
    let mut formation = base.clone();
    let mut dropped = Vec::new();
    for (name, scale) in stored.types {
        let memory = usize::try_from(scale.memory)
            .ok()
            .map(|m| ByteSize::bytes(m as u64))
            .filter(|m| m.as_u64() >= 65536)
            .ok_or_else(|| format!("memory {} for `{name}` is out of range", scale.memory))?;
        if scale.count > crate::formation::MAX_COUNT {
            return Err(format!(
                "count {} for `{name}` is out of range",
                scale.count
            ));
        }
        let known = ProcessName::new(&name).ok().is_some_and(|n| {
            formation.set(
                &n,
                Scale {
                    count: scale.count,
                    memory,
                },
            )
        });
        if !known {
            dropped.push(name);
        }
    }
    Ok((formation, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{AppSpec, ProcessSpec};

    fn formation() -> Formation {
        let app = AppSpec::new(
            PathBuf::from("/"),
            ["web", "worker"]
                .iter()
                .map(|n| {
                    ProcessSpec::new(
                        ProcessName::new(n).unwrap(),
                        PathBuf::from("/x.wasm"),
                        vec![],
                        String::new(),
                    )
                })
                .collect(),
        );
        Formation::default_for(&app, ByteSize::mib(256))
    }

    #[test]
    fn round_trips_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::for_app(dir.path());
        state.create().unwrap();
        let mode = std::fs::metadata(state.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let base = formation();
        assert!(state.load_formation(&base).unwrap().is_none());

        let changed = base
            .with_changes(&["web=3:512MiB".to_string()], None, ByteSize::mib(1024))
            .unwrap();
        state.store_formation(&changed).unwrap();
        let (loaded, dropped) = state.load_formation(&base).unwrap().unwrap();
        assert_eq!(loaded, changed);
        assert!(dropped.is_empty());

        std::fs::write(
            state.formation_file(),
            "{\"version\": 1, \"types\": {\"web\": ",
        )
        .unwrap();
        let err = state.load_formation(&base).unwrap_err().to_string();
        assert!(err.contains("formation.json` is corrupt"), "{err}");
        assert!(err.contains("delete it"), "{err}");

        std::fs::write(
            state.formation_file(),
            r#"{"version": 1, "types": {"gone": {"count": 2, "memory": 1048576}}}"#,
        )
        .unwrap();
        let (_, dropped) = state.load_formation(&base).unwrap().unwrap();
        assert_eq!(dropped, ["gone"]);
    }
}

//! Releases: immutable, numbered snapshots of the app, like Heroku's slugs and releases.
//!
//! A release holds the resolved app (every process type with its settings) and the SHA-256 of
//! each type's component. The component bytes are copied into the state directory
//! (`components/<digest>.wasm`, deduplicated), so `rollback vN` runs exactly what vN ran even
//! after the files on disk changed. `releases.json` lists them; it is written atomically like
//! the formation. Releases past the `keep` newest are pruned, with the components only they
//! used. Without a state directory (embedding) releases live in memory and components are
//! read where they are.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::app::{AppSpec, ByteSize, ProcessSpec};
use crate::state::StateDir;

/// How many releases are kept by default.
pub const DEFAULT_KEEP: usize = 20;

/// One release.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// `N` of `vN`, from 1.
    pub version: u32,
    /// When it was made (RFC 3339).
    pub created: String,
    /// What made it and what changed: `Deploy: web changed`, `Rollback to v3`.
    pub description: String,
    /// SHA-256 of the resolved configuration with component digests: equal digests run the
    /// same way.
    pub config_digest: String,
    /// Per type, the SHA-256 of its component.
    pub components: BTreeMap<String, String>,
    /// The resolved app; component paths are where the files were read from.
    pub app: AppSpec,
    /// The `config_digest` of the app's files on disk when this release was made: its own
    /// for a release made from them, the replaced release's for a rollback. `up` resumes the
    /// current release when the files still match it (a rollback survives a host restart)
    /// and deploys them when they changed. `None` in lists from before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// An app whose components were read, hashed and stored, ready to compile.
#[derive(Clone, Debug)]
pub struct Staged {
    /// The app.
    pub app: AppSpec,
    /// Per process type (same order): the file to compile (a stored copy when there is a
    /// state directory).
    pub files: Vec<PathBuf>,
    /// Per type, the component digest.
    pub components: BTreeMap<String, String>,
    /// See [`Release::config_digest`].
    pub config_digest: String,
}

impl Staged {
    /// What to compile: each process type with its file, in order.
    pub fn work(&self) -> Vec<(ProcessSpec, PathBuf)> {
        self.app
            .processes
            .iter()
            .cloned()
            .zip(self.files.iter().cloned())
            .collect()
    }
}

/// On-disk form of the list.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredReleases {
    /// Format version.
    version: u32,
    releases: Vec<Release>,
}

/// The releases of one app.
pub struct ReleaseStore {
    state: Option<StateDir>,
    /// Oldest first; the last one is current.
    releases: Vec<Release>,
    /// Releases kept (older ones are pruned).
    keep: usize,
    /// Largest component accepted.
    max_component_size: ByteSize,
}

impl ReleaseStore {
    /// Opens the store of `state` (reads `releases.json` if it exists).
    pub fn open(
        state: Option<StateDir>,
        keep: usize,
        max_component_size: ByteSize,
    ) -> Result<Self> {
        let mut releases = Vec::new();
        if let Some(state) = &state {
            let path = list_file(state);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let stored: StoredReleases = serde_json::from_str(&text).map_err(|e| {
                        anyhow::anyhow!(
                            "the release list `{}` is corrupt ({e}): fix it, or delete it (and `components/`) to start again from v1",
                            path.display()
                        )
                    })?;
                    releases = stored.releases;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to read `{}`", path.display()));
                }
            }
        }
        Ok(Self {
            state,
            releases,
            keep: keep.max(1),
            max_component_size,
        })
    }

    /// The current (newest) release.
    pub fn current(&self) -> Option<&Release> {
        self.releases.last()
    }

    /// Every kept release, oldest first.
    pub fn list(&self) -> &[Release] {
        &self.releases
    }

    /// Release `vN`.
    pub fn get(&self, version: u32) -> Option<&Release> {
        self.releases.iter().find(|r| r.version == version)
    }

    /// The number the next release gets.
    pub fn next_version(&self) -> u32 {
        self.current().map_or(1, |r| r.version + 1)
    }

    /// What reads and stores components, detached from the store so it can run on a blocking
    /// thread.
    pub fn stager(&self) -> Stager {
        Stager {
            state: self.state.clone(),
            max_component_size: self.max_component_size,
        }
    }

    /// See [`Stager::stage`].
    pub fn stage(&self, app: AppSpec, release: Option<&Release>) -> Result<Staged> {
        self.stager().stage(app, release)
    }

    /// Removes stored components that no kept release uses (those staged by a deploy that was
    /// then rejected or rolled back).
    pub fn prune_unused(&self) {
        let Some(state) = &self.state else { return };
        let used: BTreeSet<String> = self
            .releases
            .iter()
            .flat_map(|r| r.components.values())
            .map(|d| format!("{d}.wasm"))
            .collect();
        let Ok(entries) = std::fs::read_dir(state.path().join("components")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".wasm") && !used.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Records `staged` as the next release and prunes old ones. `from_files`: it was read
    /// from the app's files (not brought back from a stored release).
    pub fn record(
        &mut self,
        staged: &Staged,
        description: String,
        from_files: bool,
    ) -> Result<Release> {
        let source = if from_files {
            Some(staged.config_digest.clone())
        } else {
            self.current()
                .and_then(|r| r.source.clone().or_else(|| Some(r.config_digest.clone())))
        };
        let release = Release {
            version: self.next_version(),
            created: jiff::Timestamp::now()
                .round(jiff::Unit::Second)?
                .to_string(),
            description,
            config_digest: staged.config_digest.clone(),
            components: staged.components.clone(),
            app: staged.app.clone(),
            source,
        };
        let mut releases = self.releases.clone();
        releases.push(release.clone());
        let pruned = releases.len().saturating_sub(self.keep);
        let dropped: Vec<Release> = releases.drain(..pruned).collect();
        if let Some(state) = &self.state {
            let stored = StoredReleases {
                version: 1,
                releases: releases.clone(),
            };
            let text = serde_json::to_vec_pretty(&stored).expect("releases serialize");
            crate::state::write_atomically(&list_file(state), &text)?;
            let used: BTreeSet<&String> = releases
                .iter()
                .flat_map(|r| r.components.values())
                .collect();
            for digest in dropped.iter().flat_map(|r| r.components.values()) {
                if !used.contains(digest) {
                    let _ = std::fs::remove_file(component_file(state, digest));
                }
            }
        }
        self.releases = releases;
        Ok(release)
    }
}

/// Reads, hashes and stores components (see [`ReleaseStore::stager`]).
pub struct Stager {
    state: Option<StateDir>,
    max_component_size: ByteSize,
}

impl Stager {
    /// Reads and hashes every component of `app` (from `release`'s stored copies if given,
    /// else from the app's paths) and stores the copies. Blocking.
    pub fn stage(&self, app: AppSpec, release: Option<&Release>) -> Result<Staged> {
        let mut files = Vec::new();
        let mut components = BTreeMap::new();
        for spec in &app.processes {
            let (digest, file) = match release {
                Some(release) => {
                    let digest = release
                        .components
                        .get(spec.name.as_str())
                        .with_context(|| {
                            format!(
                                "release v{} has no component for `{}`",
                                release.version, spec.name
                            )
                        })?;
                    let file = match &self.state {
                        Some(state) => component_file(state, digest),
                        None => spec.component.clone(),
                    };
                    if !file.exists() {
                        bail!(
                            "the stored component of `{}` for v{} (`{}`) is missing: it cannot be brought back",
                            spec.name,
                            release.version,
                            file.display()
                        );
                    }
                    (digest.clone(), file)
                }
                None => self.store_component(&spec.component).with_context(|| {
                    format!(
                        "process type `{}` ({}): component `{}`",
                        spec.name,
                        spec.origin,
                        spec.component.display()
                    )
                })?,
            };
            components.insert(spec.name.to_string(), digest);
            files.push(file);
        }
        let config_digest = config_digest(&app, &components);
        Ok(Staged {
            app,
            files,
            components,
            config_digest,
        })
    }

    /// Hashes `path` and copies it into the store; returns the digest and the file to use.
    fn store_component(&self, path: &Path) -> Result<(String, PathBuf)> {
        if let Ok(meta) = std::fs::metadata(path)
            && meta.len() > self.max_component_size.as_u64()
        {
            bail!(
                "the file is {}, above the limit of {}: raise `--max-component-size` if it is meant to be this big",
                ByteSize::bytes(meta.len()),
                self.max_component_size
            );
        }
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "file not found: build it first (e.g. `cargo build --release --target wasm32-wasip2`) or fix the path"
            ),
            Err(e) => return Err(e).context("failed to read the file"),
        };
        let digest = hex(&sha2::Sha256::digest(&bytes));
        let Some(state) = &self.state else {
            return Ok((digest, path.to_path_buf()));
        };
        let file = component_file(state, &digest);
        if !file.exists() {
            let dir = file.parent().expect("inside the state directory");
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create `{}`", dir.display()))?;
            crate::state::write_atomically(&file, &bytes)?;
        }
        Ok((digest, file))
    }
}

fn list_file(state: &StateDir) -> PathBuf {
    state.path().join("releases.json")
}

fn component_file(state: &StateDir, digest: &str) -> PathBuf {
    state
        .path()
        .join("components")
        .join(format!("{digest}.wasm"))
}

/// Lowercase hex, as digests are written.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of everything that decides how the app runs: settings and component digests,
/// not where the files are or on which line a type was declared.
fn config_digest(app: &AppSpec, components: &BTreeMap<String, String>) -> String {
    let mut app = app.clone();
    app.sources.clear();
    for spec in &mut app.processes {
        spec.origin.clear();
        spec.component = PathBuf::from(&components[spec.name.as_str()]);
    }
    for service in &mut app.services {
        service.origin.clear();
    }
    let json = serde_json::to_vec(&app).expect("the app serializes");
    hex(&sha2::Sha256::digest(&json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{ProcessName, ProcessSpec};

    #[test]
    fn records_dedupes_prunes_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("a.wasm");
        std::fs::write(&wasm, b"\0asm\x0d\0\x01\0one").unwrap();
        let app = AppSpec::new(
            dir.path().to_path_buf(),
            vec![ProcessSpec::new(
                ProcessName::new("web").unwrap(),
                wasm.clone(),
                vec![],
                "Procfile:1".into(),
            )],
        );
        let state = StateDir::new(dir.path().join(".wasmform"));
        state.create().unwrap();
        let mut store = ReleaseStore::open(Some(state.clone()), 2, ByteSize::mib(1)).unwrap();
        let first = store.stage(app.clone(), None).unwrap();
        assert_eq!(store.record(&first, "one".into(), true).unwrap().version, 1);
        // Same bytes, other declaration line: same configuration.
        let mut moved = app.clone();
        moved.processes[0].origin = "Procfile:2".into();
        assert_eq!(
            store.stage(moved, None).unwrap().config_digest,
            first.config_digest
        );

        std::fs::write(&wasm, b"\0asm\x0d\0\x01\0two").unwrap();
        let second = store.stage(app.clone(), None).unwrap();
        assert_ne!(second.config_digest, first.config_digest);
        store.record(&second, "two".into(), true).unwrap();
        // v1 is still there and brings back the first bytes.
        let v1 = store.get(1).unwrap().clone();
        let back = store.stage(v1.app.clone(), Some(&v1)).unwrap();
        assert_eq!(
            std::fs::read(&back.files[0]).unwrap(),
            b"\0asm\x0d\0\x01\0one"
        );
        let v3 = store.record(&back, "rollback".into(), false).unwrap();
        // The rollback remembers the files it replaced (v2's), not its own.
        assert_eq!(v3.config_digest, first.config_digest);
        assert_eq!(v3.source.as_deref(), Some(second.config_digest.as_str()));
        // Keep 2: v1 pruned, but its component is still used by v3.
        let reopened = ReleaseStore::open(Some(state.clone()), 2, ByteSize::mib(1)).unwrap();
        let versions: Vec<u32> = reopened.list().iter().map(|r| r.version).collect();
        assert_eq!(versions, [2, 3]);
        assert!(back.files[0].exists());

        std::fs::write(list_file(&state), "{").unwrap();
        let err = ReleaseStore::open(Some(state), 2, ByteSize::mib(1))
            .err()
            .unwrap();
        assert!(err.to_string().contains("is corrupt"), "{err}");
    }
}

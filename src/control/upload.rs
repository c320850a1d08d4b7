//! `POST /v1/deploy/upload`: `wasmform deploy --remote` sends the app's files (Procfile,
//! `wasmform.toml`, `.env`, the components they name) in one request; the host writes them
//! into its app directory and deploys them as `wasmform deploy` would there.
//!
//! The body is one JSON line, `{"files": [{"path": "Procfile", "size": 12, "sha256": "…"},
//! …]}`, then every file's bytes in that order. Each file is staged in a directory of its own
//! beside the app's and checked against its size and digest while it arrives; only a complete,
//! verified upload replaces files of the app (each by a rename), and a deploy that then fails
//! puts the previous files back. An upload cut off or corrupted changes nothing.

use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{ApiBody, error};
use crate::app::ByteSize;
use crate::release::hex;

/// The content type of an upload.
pub const CONTENT_TYPE: &str = "application/vnd.wasmform.upload";

/// Largest header line.
const MAX_HEADER: usize = 1024 * 1024;

/// Most files in one upload.
pub const MAX_FILES: usize = 256;

/// The header line of an upload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    files: Vec<FileEntry>,
}

/// One file of an upload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    /// Relative to the app directory, `/`-separated.
    path: String,
    size: u64,
    /// Lowercase hex.
    sha256: String,
}

/// A complete, verified upload, staged beside the app directory.
pub struct Staged {
    /// The staging directory (removed on drop).
    stage: tempfile::TempDir,
    app: PathBuf,
    files: Vec<PathBuf>,
}

/// Files of the app replaced by an upload; the previous ones are kept until
/// [`discard`](Self::discard), so [`restore`](Self::restore) can put them back.
pub struct Installed {
    /// Holds the previous files (removed on drop).
    backup: tempfile::TempDir,
    app: PathBuf,
    /// Each installed file, and whether it existed before.
    files: Vec<(PathBuf, bool)>,
}

/// A file (or the whole upload) over the host's `--max-component-size`: 413.
fn too_large(what: &str, size: u64, max: ByteSize) -> Refusal {
    Refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "{what} is {size} bytes, over this host's --max-component-size {max}: nothing was changed"
        ),
    )
}

/// Reads and verifies an upload into a staging directory beside `app` (same filesystem, so
/// installing is a rename). Oversized uploads are refused (413) from their headers, before
/// their bytes are read.
pub async fn receive(
    req: Request<Incoming>,
    app: &Path,
    max_file: ByteSize,
) -> Result<Staged, Response<ApiBody>> {
    let bad = |message: String| error(StatusCode::BAD_REQUEST, &message);
    let length = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            error(
                StatusCode::LENGTH_REQUIRED,
                "an upload needs a Content-Length",
            )
        })?;
    let limit = max_file
        .as_u64()
        .saturating_mul(MAX_FILES as u64)
        .saturating_add(MAX_HEADER as u64);
    if length > limit {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "the upload is {length} bytes, over {MAX_FILES} files of this host's --max-component-size {max_file}: nothing was changed"
            ),
        ));
    }
    let mut body = req.into_body();
    let mut pending: Vec<u8> = Vec::new();
    // The header line.
    let manifest: Manifest = loop {
        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            break serde_json::from_slice(&line[..line.len() - 1])
                .map_err(|e| bad(format!("invalid upload header: {e}")))?;
        }
        if pending.len() > MAX_HEADER {
            return Err(bad("the upload header is over 1 MiB".into()));
        }
        match next(&mut body).await? {
            Some(data) => pending.extend_from_slice(&data),
            None => return Err(bad("the upload was cut off in its header".into())),
        }
    };
    let paths = check(&manifest, max_file).map_err(Refusal::response)?;
    let declared: u64 = manifest.files.iter().map(|f| f.size).sum();
    let stage = tempfile::Builder::new()
        .prefix(".wasmform-upload-")
        .tempdir_in(app)
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot stage the upload in `{}`: {e}", app.display()),
            )
        })?;
    let failed = |e: std::io::Error| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot write the upload in `{}`: {e}", app.display()),
        )
    };
    let mut received = 0u64;
    for (entry, path) in manifest.files.iter().zip(&paths) {
        let target = stage.path().join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        let mut file = std::fs::File::create(&target).map_err(failed)?;
        let mut hash = Sha256::new();
        let mut left = entry.size;
        while left > 0 {
            if pending.is_empty() {
                match next(&mut body).await? {
                    Some(data) => pending.extend_from_slice(&data),
                    None => {
                        return Err(bad(format!(
                            "the upload was cut off in `{}` after {} of {declared} bytes: nothing was changed",
                            entry.path,
                            received + entry.size - left
                        )));
                    }
                }
            }
            let take = pending
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            hash.update(&pending[..take]);
            file.write_all(&pending[..take]).map_err(failed)?;
            pending.drain(..take);
            left -= take as u64;
        }
        received += entry.size;
        file.sync_all().map_err(failed)?;
        let digest = hex(&hash.finalize());
        if digest != entry.sha256.to_ascii_lowercase() {
            return Err(bad(format!(
                "`{}` arrived with sha256 {digest}, not the {} its header gave: the upload was corrupted; nothing was changed",
                entry.path, entry.sha256
            )));
        }
    }
    if !pending.is_empty() || next(&mut body).await?.is_some() {
        return Err(bad(
            "the upload has bytes past its last file: nothing was changed".into(),
        ));
    }
    Ok(Staged {
        stage,
        app: app.to_path_buf(),
        files: paths,
    })
}

/// The next data of `body`, skipping trailers.
async fn next(body: &mut Incoming) -> Result<Option<bytes::Bytes>, Response<ApiBody>> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(e)) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("the upload was cut off: {e}; nothing was changed"),
                ));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Why an upload is refused: its status and message.
struct Refusal(StatusCode, String);

impl Refusal {
    fn response(self) -> Response<ApiBody> {
        error(self.0, &self.1)
    }
}

/// Each file's path, checked: relative, inside the app, not in its state directory, named
/// once, within the size cap.
fn check(manifest: &Manifest, max_file: ByteSize) -> Result<Vec<PathBuf>, Refusal> {
    let bad = |message: String| Refusal(StatusCode::BAD_REQUEST, message);
    if manifest.files.is_empty() {
        return Err(bad("the upload names no file".into()));
    }
    if manifest.files.len() > MAX_FILES {
        return Err(bad(format!(
            "the upload names {} files; at most {MAX_FILES}",
            manifest.files.len()
        )));
    }
    let mut paths = Vec::new();
    for entry in &manifest.files {
        let path = PathBuf::from(&entry.path);
        let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain || entry.path.is_empty() || path.starts_with(".wasmform") {
            return Err(bad(format!(
                "upload path `{}`: must be relative to the app directory, without `..`, and not in `.wasmform/`",
                entry.path
            )));
        }
        if paths.contains(&path) {
            return Err(bad(format!("upload path `{}` is named twice", entry.path)));
        }
        if entry.size > max_file.as_u64() {
            return Err(too_large(
                &format!("`{}`", entry.path),
                entry.size,
                max_file,
            ));
        }
        paths.push(path);
    }
    Ok(paths)
}

impl Staged {
    /// Moves every file into the app directory (a rename each), keeping the ones replaced.
    /// Blocking.
    pub fn install(self) -> std::io::Result<Installed> {
        let backup = tempfile::Builder::new()
            .prefix(".wasmform-previous-")
            .tempdir_in(&self.app)?;
        let mut installed = Installed {
            backup,
            app: self.app.clone(),
            files: Vec::new(),
        };
        for path in &self.files {
            let target = self.app.join(path);
            let existed = target.exists();
            if existed {
                let kept = installed.backup.path().join(path);
                if let Some(parent) = kept.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::copy(&target, &kept)?;
            } else if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if let Err(e) = std::fs::rename(self.stage.path().join(path), &target) {
                installed.restore();
                return Err(e);
            }
            installed.files.push((path.clone(), existed));
        }
        Ok(installed)
    }
}

impl Installed {
    /// Puts the previous files back (the deploy failed). Blocking.
    pub fn restore(self) {
        for (path, existed) in &self.files {
            let target = self.app.join(path);
            let outcome = if *existed {
                std::fs::rename(self.backup.path().join(path), &target)
            } else {
                std::fs::remove_file(&target)
            };
            if let Err(e) = outcome {
                tracing::warn!(
                    "cannot restore `{}` after a failed upload: {e}",
                    target.display()
                );
            }
        }
    }
}

/// The body of an upload of `files` (each path relative to the app directory, and its
/// bytes): the header line, then every file. Used by `wasmform deploy --remote`.
pub fn encode(files: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    let manifest = Manifest {
        files: files
            .iter()
            .map(|(path, bytes)| FileEntry {
                path: path
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/"),
                size: bytes.len() as u64,
                sha256: hex(&Sha256::digest(bytes)),
            })
            .collect(),
    };
    let mut body = serde_json::to_vec(&manifest).expect("the manifest serializes");
    body.push(b'\n');
    for (_, bytes) in files {
        body.extend_from_slice(bytes);
    }
    body
}

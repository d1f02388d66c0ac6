//! Running the real `kustomize build` over an app's fetched inputs: laid out in a private
//! temporary directory as in the repository, built with the load restrictor on and plugins,
//! exec functions and Helm off, in a clean environment, within a timeout and an output bound.

use std::path::Path;
use std::process::Stdio;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::forge::AppFile;
use crate::settings::RenderSettings;

use super::RenderError;

/// Flags appended to the command, whatever it is: what a kustomization may load stays in the
/// commit and nothing it names runs a program.
pub const SAFE_FLAGS: [&str; 3] = [
    "--load-restrictor=LoadRestrictionsRootOnly",
    "--enable-alpha-plugins=false",
    "--enable-helm=false",
];

/// Bytes of Kustomize's error output kept for the run's message.
const MAX_STDERR_BYTES: usize = 16 * 1024;

/// Builds the kustomization at `app_path` from `files` (paths from the repository root).
pub async fn build(
    settings: &RenderSettings,
    app_path: &str,
    files: &[AppFile],
) -> Result<Bytes, RenderError> {
    let dir = tempfile::Builder::new()
        .prefix("driftless-render-")
        .tempdir()
        .map_err(|e| RenderError::Io(format!("creating a temporary directory: {e}")))?;
    let root = dir.path().to_path_buf();
    let owned: Vec<(String, Bytes)> = files
        .iter()
        .map(|f| (f.path.clone(), f.content.clone()))
        .collect();
    let layout = root.clone();
    tokio::task::spawn_blocking(move || materialize(&layout, &owned))
        .await
        .map_err(|e| RenderError::Io(e.to_string()))??;
    let result = run(settings, &root, app_path).await;
    // Removed on every path (the guard's drop), but off the async threads.
    let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
    result
}

/// Writes each file under `root`; paths come from the forge's tree and are checked again
/// here, so no entry can write outside `root`.
fn materialize(root: &Path, files: &[(String, Bytes)]) -> Result<(), RenderError> {
    for (path, content) in files {
        if path.is_empty()
            || path.starts_with('/')
            || path
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(RenderError::Io(format!(
                "{path:?} is not a plain relative path"
            )));
        }
        let target = root.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| RenderError::Io(format!("creating the directory of {path}: {e}")))?;
        }
        std::fs::write(&target, content)
            .map_err(|e| RenderError::Io(format!("writing {path}: {e}")))?;
    }
    Ok(())
}

async fn run(settings: &RenderSettings, root: &Path, app_path: &str) -> Result<Bytes, RenderError> {
    let (program, args) = settings
        .kustomize_command
        .split_first()
        .expect("settings validation requires a program");
    let target = if app_path.is_empty() {
        root.to_path_buf()
    } else {
        root.join(app_path)
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .arg(&target)
        .args(SAFE_FLAGS)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", root)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RenderError::Spawn {
            command: settings.kustomize_command.clone(),
            message: e.to_string(),
        })?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let limit = settings.max_output_bytes;
    let work = async {
        let (out, err, status) = tokio::join!(
            read_bounded(stdout, limit, true),
            read_bounded(stderr, MAX_STDERR_BYTES, false),
            child.wait()
        );
        (out, err, status)
    };
    let Ok((out, err, status)) = tokio::time::timeout(settings.timeout, work).await else {
        return Err(RenderError::Timeout {
            app_path: app_path.to_string(),
            timeout: settings.timeout,
        });
    };
    let io = |e: std::io::Error| RenderError::Io(format!("reading kustomize's output: {e}"));
    let (out, out_over) = out.map_err(io)?;
    let (err, _) = err.map_err(io)?;
    let status = status.map_err(io)?;
    if out_over {
        return Err(RenderError::TooLarge {
            app_path: app_path.to_string(),
            limit,
        });
    }
    if !status.success() {
        let text = String::from_utf8_lossy(&err);
        let prefix = format!("{}/", root.display());
        let message = text
            .replace(&prefix, "")
            .replace(&root.display().to_string(), ".")
            .trim()
            .trim_start_matches("Error: ")
            .to_string();
        return Err(RenderError::Build {
            app_path: app_path.to_string(),
            message: if message.is_empty() {
                format!("exited with {status}")
            } else {
                message
            },
        });
    }
    Ok(Bytes::from(out))
}

/// Reads up to `limit` bytes and says whether there was more. Past the limit it either stops
/// reading (`stop`: the pipe closes and the child dies of it instead of printing on until the
/// timeout) or drains the rest, so the child never blocks on a full pipe.
async fn read_bounded(
    mut from: impl AsyncRead + Unpin,
    limit: usize,
    stop: bool,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut over = false;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok((out, over));
        }
        let room = limit.saturating_sub(out.len());
        if n > room {
            over = true;
            if stop {
                return Ok((out, over));
            }
        }
        out.extend_from_slice(&buf[..n.min(room)]);
    }
}

//! The inputs of a Kustomize app, found through the forge API without a clone: starting at the
//! app's kustomization, every kustomization it builds on (`resources`, `bases`, `components`,
//! recursively) is read, and the directories holding them are the app's inputs. Kustomize's
//! load restrictor keeps every other file a kustomization reads in or below its own directory,
//! so fetching those directories whole gives the render everything it may read, and their
//! subtree SHAs say exactly when the render could change.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::forge::{self, BlobCache, EntryKind, Forge, ForgeError, TreeEntry};
use crate::manifest::{self, Budget};

use super::kustomization::{self, FILE_NAMES};
use super::RenderError;

/// Most kustomizations one app may reach: each costs a listing of its directory.
pub const MAX_KUSTOMIZATIONS: usize = 256;

/// What a Kustomize app's render reads at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The directories fetched whole (none below another), with their subtree SHAs.
    pub dirs: BTreeMap<String, String>,
    /// Every file below those directories, keyed by (and with entry paths from) the
    /// repository root.
    pub files: BTreeMap<String, TreeEntry>,
}

/// The kustomization file among a directory's entries (relative paths), if any.
pub fn kustomization_file(entries: &[TreeEntry]) -> Option<&TreeEntry> {
    FILE_NAMES
        .iter()
        .find_map(|name| entries.iter().find(|e| e.path == *name))
}

/// Who asked for a directory: the kustomization file and its reference (none for the app).
struct Wanted {
    dir: String,
    by: Option<(String, kustomization::Reference)>,
}

/// Walks the kustomizations of the app at `app_path` (whose entries the caller already listed)
/// and lists their directories. Refuses, naming the kustomization file and the reference: a
/// remote base, an absolute path, a path outside the repository, a directory that does not
/// exist or holds no kustomization, Helm charts, symlinks and submodules.
pub async fn resolve(
    forge: &dyn Forge,
    blobs: &BlobCache,
    repo: &str,
    commit: &str,
    app_path: &str,
    app_entries: Vec<TreeEntry>,
) -> Result<Inputs, RenderError> {
    let mut listed: BTreeMap<String, Vec<TreeEntry>> = BTreeMap::new();
    listed.insert(app_path.to_string(), app_entries);
    let mut queue = VecDeque::from([Wanted {
        dir: app_path.to_string(),
        by: None,
    }]);
    let mut visited = BTreeSet::new();
    // Shared by every kustomization of the app, like the manifests of one app.
    let mut budget = Budget::default();
    while let Some(wanted) = queue.pop_front() {
        if !visited.insert(wanted.dir.clone()) {
            continue;
        }
        if visited.len() > MAX_KUSTOMIZATIONS {
            return Err(RenderError::TooManyKustomizations {
                app_path: app_path.to_string(),
                limit: MAX_KUSTOMIZATIONS,
            });
        }
        let entries = match listed.get(&wanted.dir) {
            Some(e) => e.clone(),
            None => {
                let e = list_referenced(forge, repo, commit, &wanted).await?;
                listed.insert(wanted.dir.clone(), e.clone());
                e
            }
        };
        let Some(file) = kustomization_file(&entries) else {
            return Err(RenderError::NoKustomization {
                dir: wanted.dir.clone(),
                by: wanted
                    .by
                    .map(|(f, r)| format!("{} {:?} in {f}", r.field, r.path)),
            });
        };
        let file_path = forge::repo_path(&wanted.dir, &file.path);
        let content = match blobs.get(&file.sha) {
            Some(c) => c,
            None => {
                let c = forge.blob(repo, &file.sha).await?;
                blobs.insert(&file.sha, c.clone());
                c
            }
        };
        let doc = manifest::parse_config(&file_path, &content, &mut budget)?;
        let refs = kustomization::references(&doc);
        if let Some(field) = refs.unsupported.first() {
            return Err(RenderError::Helm {
                kustomization: file_path,
                field,
            });
        }
        for r in &refs.files {
            kustomization::resolve(&wanted.dir, &r.path)
                .map_err(|why| refused(&file_path, r, why))?;
        }
        for r in refs.builds_on {
            let target = kustomization::resolve(&wanted.dir, &r.path)
                .map_err(|why| refused(&file_path, &r, why))?;
            match locate(&wanted.dir, &entries, &target) {
                Located::File => {}
                Located::Dir => queue.push_back(Wanted {
                    dir: target,
                    by: Some((file_path.clone(), r)),
                }),
                Located::Missing if kustomization::looks_like_host(&r.path) => {
                    return Err(refused(&file_path, &r, kustomization::REMOTE))
                }
                Located::Missing => {
                    return Err(refused(&file_path, &r, "is not in the commit"));
                }
            }
        }
    }
    covering(forge, repo, commit, listed).await
}

fn refused(file: &str, r: &kustomization::Reference, why: &str) -> RenderError {
    RenderError::Reference {
        kustomization: file.to_string(),
        field: r.field,
        reference: r.path.clone(),
        reason: why.to_string(),
    }
}

enum Located {
    File,
    Dir,
    Missing,
}

/// What `target` (from the repository root) is, as far as the entries of `dir` tell; a
/// target outside `dir` is taken for a directory and checked when it is listed.
fn locate(dir: &str, entries: &[TreeEntry], target: &str) -> Located {
    let rel = if dir.is_empty() {
        Some(target)
    } else if target == dir {
        Some("")
    } else {
        target.strip_prefix(dir).and_then(|r| r.strip_prefix('/'))
    };
    let Some(rel) = rel else {
        return Located::Dir;
    };
    if rel.is_empty() {
        // A kustomization that builds on its own directory: Kustomize reports the cycle.
        return Located::Dir;
    }
    if entries.iter().any(|e| e.path == rel) {
        return Located::File;
    }
    let prefix = format!("{rel}/");
    if entries.iter().any(|e| e.path.starts_with(&prefix)) {
        Located::Dir
    } else {
        Located::Missing
    }
}

/// Lists a directory another kustomization builds on; a missing one is that reference's fault.
async fn list_referenced(
    forge: &dyn Forge,
    repo: &str,
    commit: &str,
    wanted: &Wanted,
) -> Result<Vec<TreeEntry>, RenderError> {
    match forge::list_entries(forge, repo, commit, &wanted.dir).await {
        Err(ForgeError::NotFound { .. }) => {
            let (file, r) = wanted
                .by
                .as_ref()
                .expect("only the app itself has no referrer");
            Err(refused(
                file,
                r,
                "is not a directory of this commit (outside its own directory a kustomization can only build on directories of other kustomizations)",
            ))
        }
        other => Ok(other?),
    }
}

/// The listed directories that are not below another, with their SHAs and files.
async fn covering(
    forge: &dyn Forge,
    repo: &str,
    commit: &str,
    listed: BTreeMap<String, Vec<TreeEntry>>,
) -> Result<Inputs, RenderError> {
    let tops: Vec<&String> = listed
        .keys()
        .filter(|d| !listed.keys().any(|o| o != *d && is_below(d, o)))
        .collect();
    let mut inputs = Inputs {
        dirs: BTreeMap::new(),
        files: BTreeMap::new(),
    };
    for dir in tops {
        let sha = forge.subtree_sha(repo, commit, dir).await?;
        inputs.dirs.insert(dir.clone(), sha);
        for e in &listed[dir] {
            if matches!(e.kind, EntryKind::File | EntryKind::Executable) {
                let path = forge::repo_path(dir, &e.path);
                let entry = TreeEntry {
                    path: path.clone(),
                    ..e.clone()
                };
                inputs.files.insert(path, entry);
            }
        }
    }
    Ok(inputs)
}

/// Whether `dir` is strictly below `other` (the root `""` is above everything).
fn is_below(dir: &str, other: &str) -> bool {
    (other.is_empty() && !dir.is_empty())
        || dir
            .strip_prefix(other)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_outermost_directories_are_inputs() {
        assert!(is_below("base/web", "base"));
        assert!(is_below("base", ""));
        assert!(!is_below("base-2", "base"));
        assert!(!is_below("base", "base"));
        assert!(!is_below("", ""));
    }

    fn file(path: &str) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            sha: "0".into(),
            kind: EntryKind::File,
            size: Some(1),
        }
    }

    #[test]
    fn a_reference_is_a_file_a_directory_or_missing() {
        let entries = [
            file("kustomization.yaml"),
            file("a.yaml"),
            file("sub/kustomization.yaml"),
        ];
        assert!(matches!(
            locate("app", &entries, "app/a.yaml"),
            Located::File
        ));
        assert!(matches!(locate("app", &entries, "app/sub"), Located::Dir));
        assert!(matches!(
            locate("app", &entries, "app/nope"),
            Located::Missing
        ));
        assert!(matches!(locate("app", &entries, "base/web"), Located::Dir));
        assert!(matches!(locate("", &entries, "a.yaml"), Located::File));
    }
}

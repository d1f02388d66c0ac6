//! The simulator's access to a real repository on disk, through the `git` CLI (no libgit2 in
//! the dependency tree, and the CLI is the reference behaviour the forges reproduce). Every
//! answer the simulator gives about commits, trees and blobs comes from here. Objects named by
//! SHA are read through one `git cat-file --batch` kept per repository, not a process each.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Why asking git failed (as opposed to git saying "no such object", which is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum GitError {
    #[error("running git {args} in {dir}: {source}")]
    Spawn {
        args: String,
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("git {args} in {dir} failed ({status}): {stderr}")]
    Failed {
        args: String,
        dir: String,
        status: String,
        stderr: String,
    },
    #[error("git {args}: unexpected output: {detail}")]
    Parse { args: String, detail: String },
}

/// One entry of `git ls-tree -l`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TreeEntry {
    /// As git prints it: `100644`, `100755`, `040000`, `120000`, `160000`.
    pub mode: String,
    /// `blob`, `tree` or `commit` (a submodule).
    pub kind: String,
    pub sha: String,
    /// Blobs only.
    pub size: Option<u64>,
    /// Relative to the listed tree.
    pub path: String,
}

/// Who wrote or committed a commit, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Signature {
    pub name: String,
    pub email: String,
    /// Unix seconds.
    pub time: i64,
    /// Strict ISO 8601 with the original offset (`2024-05-01T12:00:00+02:00`).
    pub iso: String,
}

/// What the forges report about a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommitInfo {
    pub sha: String,
    pub tree: String,
    pub parents: Vec<String>,
    pub author: Signature,
    pub committer: Signature,
    /// The full message without its trailing newline.
    pub message: String,
}

impl CommitInfo {
    /// The first line of the message.
    pub fn title(&self) -> &str {
        self.message.lines().next().unwrap_or("")
    }
}

/// One changed file between two commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileChange {
    pub path: String,
    /// `A`, `D`, `M` or `T` (renames are not detected, as `--no-renames`).
    pub status: char,
    pub old_sha: String,
    pub new_sha: String,
    /// `None` for a binary file.
    pub additions: Option<u64>,
    pub deletions: Option<u64>,
}

/// `git log` format of one commit: fixed fields, each followed by NUL under `-z`; the message
/// comes last because it is the only field that may contain newlines (never NUL).
const COMMIT_FORMAT: &str =
    "--format=%H%x00%T%x00%P%x00%an%x00%ae%x00%at%x00%aI%x00%cn%x00%ce%x00%ct%x00%cI%x00%B";
const COMMIT_FIELDS: usize = 12;

/// A repository the simulator serves.
#[derive(Debug, Clone)]
pub(crate) struct Repo {
    dir: PathBuf,
    /// One `git cat-file --batch` kept running for object lookups, started on first use: a
    /// blob or a commit status would otherwise cost a git process or two each, CPU that a
    /// benchmark sharing the machine with the cluster would count against the reconciler.
    objects: Arc<tokio::sync::Mutex<Option<Batch>>>,
}

/// A running `git cat-file --batch`.
#[derive(Debug)]
struct Batch {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Batch {
    /// One exchange: `name` in, its header and content out.
    async fn ask(&mut self, name: &str) -> std::io::Result<Option<Object>> {
        self.stdin.write_all(format!("{name}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let mut header = String::new();
        self.stdout.read_line(&mut header).await?;
        let fields: Vec<&str> = header.split_whitespace().collect();
        match fields[..] {
            [sha, kind, size] => {
                let size: usize = size.parse().map_err(std::io::Error::other)?;
                let mut bytes = vec![0; size + 1];
                self.stdout.read_exact(&mut bytes).await?;
                bytes.pop(); // the newline after the content
                Ok(Some(Object {
                    sha: sha.to_string(),
                    kind: kind.to_string(),
                    bytes,
                }))
            }
            [_, "missing" | "ambiguous"] => Ok(None),
            _ => Err(std::io::Error::other(format!(
                "unexpected answer {header:?}"
            ))),
        }
    }
}

/// An object as `git cat-file --batch` names it: full SHA, type and content.
struct Object {
    sha: String,
    kind: String,
    bytes: Vec<u8>,
}

impl Object {
    /// Whether this is an object of `kind` whose SHA starts with `name` (not one git found
    /// by another reading of the name, such as a ref).
    fn is(&self, kind: &str, name: &str) -> bool {
        self.kind == kind && self.sha.starts_with(&name.to_ascii_lowercase())
    }
}

impl Repo {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            objects: Arc::default(),
        }
    }

    /// The object `name` (a SHA or a prefix of one, as git resolves object names) names, read
    /// through the kept `cat-file --batch`; `None` when it names none (or several).
    ///
    /// The batch is taken out of its slot for the exchange and put back only once the whole
    /// answer is read: a lookup cut short (its request dropped mid-answer) drops the batch
    /// with it, so the next lookup never reads the rest of an old answer as its own.
    async fn object(&self, name: &str) -> Result<Option<Object>, GitError> {
        let io = |source: std::io::Error| GitError::Spawn {
            args: "cat-file --batch".to_string(),
            dir: self.dir.display().to_string(),
            source,
        };
        let mut slot = self.objects.lock().await;
        let mut batch = match slot.take() {
            Some(batch) => batch,
            None => self.start_batch().map_err(io)?,
        };
        let answer = batch.ask(name).await.map_err(io)?;
        *slot = Some(batch);
        Ok(answer)
    }

    fn start_batch(&self) -> std::io::Result<Batch> {
        let mut child = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(["cat-file", "--batch"])
            .env_remove("GIT_DIR")
            .env_remove("GIT_OBJECT_DIRECTORY")
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            return Err(std::io::Error::other("no pipes to git cat-file"));
        };
        Ok(Batch {
            _child: child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    async fn output(&self, args: &[&str]) -> Result<Output, GitError> {
        Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(args)
            // The caller's environment must not redirect git to another repository.
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .env_remove("GIT_OBJECT_DIRECTORY")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| GitError::Spawn {
                args: args.join(" "),
                dir: self.dir.display().to_string(),
                source,
            })
    }

    /// Runs git and returns stdout; a non-zero exit is an error.
    async fn run(&self, args: &[&str]) -> Result<Vec<u8>, GitError> {
        let out = self.output(args).await?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(self.failed(args, &out))
        }
    }

    /// Runs git; exit status 1 (git's "not found" / "no") is `Ok(None)`.
    async fn run_optional(&self, args: &[&str]) -> Result<Option<Vec<u8>>, GitError> {
        let out = self.output(args).await?;
        match out.status.code() {
            Some(0) => Ok(Some(out.stdout)),
            Some(1) => Ok(None),
            _ => Err(self.failed(args, &out)),
        }
    }

    fn failed(&self, args: &[&str], out: &Output) -> GitError {
        GitError::Failed {
            args: args.join(" "),
            dir: self.dir.display().to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
    }

    /// Resolves a revision (`main`, a SHA, `main:dir`) peeled to `kind` (`commit`, `tree`,
    /// `blob`); `None` when it names nothing of that kind.
    pub async fn resolve(&self, rev: &str, kind: &str) -> Result<Option<String>, GitError> {
        if !safe_rev(rev) {
            return Ok(None);
        }
        if is_hex(rev) {
            // An object named by its SHA that is already of the kind asked for: no peeling, so
            // the kept batch answers. Anything else (a tag to peel, a missing name that could
            // be a ref) goes to rev-parse.
            if let Some(o) = self.object(rev).await?.filter(|o| o.is(kind, rev)) {
                return Ok(Some(o.sha));
            }
        }
        if rev.contains(':') {
            // In `rev:path` a `^{kind}` suffix would be read as part of the path: resolve the
            // object, then check its type.
            let Some(sha) = self.rev_parse(rev).await? else {
                return Ok(None);
            };
            let found = self.run(&["cat-file", "-t", &sha]).await?;
            return Ok((String::from_utf8_lossy(&found).trim() == kind).then_some(sha));
        }
        self.rev_parse(&format!("{rev}^{{{kind}}}")).await
    }

    async fn rev_parse(&self, spec: &str) -> Result<Option<String>, GitError> {
        let out = self
            .output(&["rev-parse", "--verify", "--quiet", spec])
            .await?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }

    /// The object a full ref name (`refs/heads/main`) points at, and that object's type
    /// (`commit`, or `tag` for an annotated tag).
    pub async fn show_ref(&self, full_ref: &str) -> Result<Option<(String, String)>, GitError> {
        if !safe_rev(full_ref) || !full_ref.starts_with("refs/") {
            return Ok(None);
        }
        let out = self
            .run(&[
                "for-each-ref",
                "--format=%(objectname) %(objecttype) %(refname)",
                full_ref,
            ])
            .await?;
        // for-each-ref also lists refs below the pattern (`refs/heads/main/x`); only an
        // exact name counts.
        Ok(String::from_utf8_lossy(&out).lines().find_map(|line| {
            let mut fields = line.splitn(3, ' ');
            let (sha, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
            (name == full_ref).then(|| (sha.to_string(), kind.to_string()))
        }))
    }

    /// The branch `HEAD` points at (the repository's default branch).
    pub async fn default_branch(&self) -> Result<Option<String>, GitError> {
        Ok(self
            .run_optional(&["symbolic-ref", "--quiet", "--short", "HEAD"])
            .await?
            .map(|out| String::from_utf8_lossy(&out).trim().to_string()))
    }

    /// The entries of a tree, with sizes; recursive listings include the subtrees themselves,
    /// each before its contents (`ls-tree -r -t`), as GitHub lists them.
    pub async fn ls_tree(&self, tree: &str, recursive: bool) -> Result<Vec<TreeEntry>, GitError> {
        let mut args = vec!["ls-tree", "-l", "-z"];
        if recursive {
            args.extend(["-r", "-t"]);
        }
        args.push(tree);
        let out = self.run(&args).await?;
        out.split(|&b| b == 0)
            .filter(|r| !r.is_empty())
            .map(|record| parse_ls_tree(record).ok_or_else(|| parse_error(&args, record)))
            .collect()
    }

    /// A blob's full name and bytes; `None` when `sha` names no blob.
    pub async fn blob(&self, sha: &str) -> Result<Option<(String, Vec<u8>)>, GitError> {
        if !is_hex(sha) {
            return Ok(None);
        }
        // A blob endpoint answers for blob names only (never a tag peeled to its blob).
        if let Some(o) = self.object(sha).await?.filter(|o| o.is("blob", sha)) {
            return Ok(Some((o.sha, o.bytes)));
        }
        // Not found by the batch: asked again through git processes, as the batch is only a
        // shortcut for what exists.
        let Some(full) = self.rev_parse(&format!("{sha}^{{blob}}")).await? else {
            return Ok(None);
        };
        if !full.starts_with(&sha.to_ascii_lowercase()) {
            return Ok(None);
        }
        let bytes = self.run(&["cat-file", "blob", &full]).await?;
        Ok(Some((full, bytes)))
    }

    /// One commit.
    pub async fn commit(&self, rev: &str) -> Result<Option<CommitInfo>, GitError> {
        let Some(sha) = self.resolve(rev, "commit").await? else {
            return Ok(None);
        };
        let mut commits = self.log(&["-1", &sha]).await?;
        Ok(commits.pop())
    }

    /// Commits of a `git log` selection (e.g. `["--reverse", "a..b"]`).
    pub async fn log(&self, selection: &[&str]) -> Result<Vec<CommitInfo>, GitError> {
        let mut args = vec!["log", "-z", COMMIT_FORMAT];
        args.extend_from_slice(selection);
        args.push("--");
        let out = self.run(&args).await?;
        let text = String::from_utf8_lossy(&out);
        let fields: Vec<&str> = text.split('\0').collect();
        fields
            .chunks(COMMIT_FIELDS)
            .filter(|c| !(c.len() == 1 && c[0].is_empty()))
            .map(|c| parse_commit(c).ok_or_else(|| parse_error(&args, c.join("|").as_bytes())))
            .collect()
    }

    /// The best common ancestor of the revisions; `None` when they share no history.
    pub async fn merge_base(&self, revs: &[&str]) -> Result<Option<String>, GitError> {
        if revs.iter().any(|r| !safe_rev(r)) {
            return Ok(None);
        }
        let mut args = vec!["merge-base"];
        args.extend_from_slice(revs);
        Ok(self
            .run_optional(&args)
            .await?
            .map(|out| String::from_utf8_lossy(&out).trim().to_string()))
    }

    /// Whether `ancestor` is reachable from `descendant`.
    pub async fn is_ancestor(&self, ancestor: &str, descendant: &str) -> Result<bool, GitError> {
        if !safe_rev(ancestor) || !safe_rev(descendant) {
            return Ok(false);
        }
        Ok(self
            .run_optional(&["merge-base", "--is-ancestor", ancestor, descendant])
            .await?
            .is_some())
    }

    /// `git rev-list --count <range>`.
    pub async fn count(&self, range: &str) -> Result<u64, GitError> {
        let args = ["rev-list", "--count", range, "--"];
        let out = self.run(&args).await?;
        String::from_utf8_lossy(&out)
            .trim()
            .parse()
            .map_err(|_| parse_error(&args, &out))
    }

    /// Commit SHAs of a `git rev-list` selection.
    pub async fn rev_list(&self, selection: &[&str]) -> Result<Vec<String>, GitError> {
        let mut args = vec!["rev-list"];
        args.extend_from_slice(selection);
        args.push("--");
        let out = self.run(&args).await?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Local branches whose history contains `sha`.
    pub async fn branches_containing(&self, sha: &str) -> Result<Vec<String>, GitError> {
        if !safe_rev(sha) {
            return Ok(Vec::new());
        }
        let out = self
            .run(&[
                "for-each-ref",
                "--format=%(refname:short)",
                "--contains",
                sha,
                "refs/heads",
            ])
            .await?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Files changed from `from` to `to` (both commits or trees); `from = None` diffs against
    /// the empty tree.
    pub async fn diff(&self, from: Option<&str>, to: &str) -> Result<Vec<FileChange>, GitError> {
        let from = from.unwrap_or(EMPTY_TREE);
        let raw_args = ["diff-tree", "-r", "-z", "--no-renames", "--raw", from, to];
        let raw = self.run(&raw_args).await?;
        let mut changes = Vec::new();
        let mut records = raw.split(|&b| b == 0).filter(|r| !r.is_empty());
        while let Some(meta) = records.next() {
            let meta = String::from_utf8_lossy(meta);
            let path = records
                .next()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .ok_or_else(|| parse_error(&raw_args, meta.as_bytes()))?;
            // `:100644 100644 <old> <new> M`
            let fields: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
            let [_, _, old, new, status] = fields[..] else {
                return Err(parse_error(&raw_args, meta.as_bytes()));
            };
            changes.push(FileChange {
                path,
                status: status.chars().next().unwrap_or('M'),
                old_sha: old.to_string(),
                new_sha: new.to_string(),
                additions: None,
                deletions: None,
            });
        }
        let num_args = [
            "diff-tree",
            "-r",
            "-z",
            "--no-renames",
            "--numstat",
            from,
            to,
        ];
        let numstat = self.run(&num_args).await?;
        for record in numstat.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            // `<added>\t<deleted>\t<path>`, `-` for binary files.
            let record = String::from_utf8_lossy(record);
            let mut parts = record.splitn(3, '\t');
            let (Some(added), Some(deleted), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let Some(change) = changes.iter_mut().find(|c| c.path == path) {
                change.additions = added.parse().ok();
                change.deletions = deleted.parse().ok();
            }
        }
        Ok(changes)
    }
}

/// The SHA-1 of the empty tree, which every SHA-1 repository knows without storing it.
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// A revision git may be asked about: never an option, never multi-line.
fn safe_rev(rev: &str) -> bool {
    !rev.is_empty() && !rev.starts_with('-') && !rev.contains(['\0', '\n', '\r'])
}

/// An abbreviated or full object name.
pub(crate) fn is_hex(s: &str) -> bool {
    (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn parse_error(args: &[&str], output: &[u8]) -> GitError {
    GitError::Parse {
        args: args.join(" "),
        detail: String::from_utf8_lossy(&output[..output.len().min(200)]).into_owned(),
    }
}

/// `<mode> SP <type> SP <sha> SP+ <size> TAB <path>`.
fn parse_ls_tree(record: &[u8]) -> Option<TreeEntry> {
    let record = String::from_utf8_lossy(record);
    let (meta, path) = record.split_once('\t')?;
    let mut fields = meta.split_whitespace();
    let (mode, kind, sha, size) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    Some(TreeEntry {
        mode: mode.to_string(),
        kind: kind.to_string(),
        sha: sha.to_string(),
        size: size.parse().ok(),
        path: path.to_string(),
    })
}

fn parse_commit(f: &[&str]) -> Option<CommitInfo> {
    if f.len() != COMMIT_FIELDS {
        return None;
    }
    let signature = |name: &str, email: &str, time: &str, iso: &str| {
        Some(Signature {
            name: name.to_string(),
            email: email.to_string(),
            time: time.parse().ok()?,
            iso: iso.to_string(),
        })
    };
    Some(CommitInfo {
        // Under `-z` the NUL between commits follows the message; nothing precedes the SHA,
        // but be lenient about a stray newline.
        sha: f[0].trim().to_string(),
        tree: f[1].to_string(),
        parents: f[2].split_whitespace().map(str::to_string).collect(),
        author: signature(f[3], f[4], f[5], f[6])?,
        committer: signature(f[7], f[8], f[9], f[10])?,
        message: f[11].trim_end_matches('\n').to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_tree_records() {
        let e = parse_ls_tree(
            b"100644 blob 78981922613b2afb6025042ff6bd878ac1994e85       2\tdir/a file",
        )
        .unwrap();
        assert_eq!(
            (e.mode.as_str(), e.kind.as_str(), e.size, e.path.as_str()),
            ("100644", "blob", Some(2), "dir/a file")
        );
        let t = parse_ls_tree(b"040000 tree 6c40b4c1cc635f607d67ce066c2594c7b7309c9a       -\td")
            .unwrap();
        assert_eq!((t.kind.as_str(), t.size), ("tree", None));
        assert!(parse_ls_tree(b"garbage").is_none());
    }

    #[test]
    fn revisions_that_look_like_options_are_refused() {
        assert!(!safe_rev("--output=/tmp/x"));
        assert!(!safe_rev(""));
        assert!(safe_rev("feature/x"));
        assert!(is_hex("abcd") && !is_hex("abc") && !is_hex("main"));
    }
}

//! The pull request comment (GitHub issue comment, GitLab MR note): one per request, found
//! again by a marker so it is edited in place on every new head, with a table of the affected
//! apps and each app's diff folded. It always fits the forge's limit: when the diffs do not,
//! each app gets a fair share and the rest is cut with a link to the full preview page.

use super::report::{AppOutcome, PullRequestPreview, RequestState};

/// The first line of every preview comment: how driftless finds its own comment again.
pub const MARKER: &str = "<!-- driftless-preview -->";
/// Room kept below the forge's limit for the lines around the diffs and for counting slack.
const MARGIN: usize = 512;

/// The comment for `p`, at most `limit` characters.
pub fn render(p: &PullRequestPreview, limit: usize) -> String {
    if p.state != RequestState::Open {
        return render_closed(p);
    }
    let mut head = format!(
        "{MARKER}\n### driftless preview of `{}`\n\n",
        short(&p.head_sha)
    );
    if p.apps.is_empty() {
        head.push_str("This change affects no app.\n");
        return head;
    }
    head.push_str("| app | result | summary |\n|---|---|---|\n");
    for a in &p.apps {
        let result = match a.outcome {
            AppOutcome::Previewed if a.has_changes() => "changes",
            AppOutcome::Previewed => "no change",
            AppOutcome::Rejected { .. } => "**rejected**",
            AppOutcome::Failed { .. } => "**failed**",
        };
        head.push_str(&format!(
            "| `{}` | {result} | {} |\n",
            a.app,
            table_cell(&a.summary())
        ));
    }
    if !p.not_previewed.is_empty() {
        head.push_str(&format!(
            "\n{} more affected apps were not previewed (`previews.max_apps = {}`): {}\n",
            p.not_previewed.len(),
            p.max_apps,
            p.not_previewed
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let foot = match &p.page_url {
        Some(url) => format!("\nFull preview: {url}\n"),
        None => String::new(),
    };
    let budget = limit.saturating_sub(chars(&head) + chars(&foot) + MARGIN);
    let sections = fit(p, budget);
    format!("{head}\n{}{foot}", sections.concat())
}

/// Each app's folded diff, in the apps' order, together at most `budget` characters: the
/// shortest sections are kept whole and the rest share what is left equally.
fn fit(p: &PullRequestPreview, budget: usize) -> Vec<String> {
    let whole: Vec<String> = p
        .apps
        .iter()
        .map(|a| section(&a.app, &a.summary(), &a.diff_text(), None))
        .collect();
    let mut order: Vec<usize> = (0..whole.len()).collect();
    order.sort_by_key(|&i| chars(&whole[i]));
    let mut out = whole.clone();
    let mut left = budget;
    for (done, &i) in order.iter().enumerate() {
        let share = left / (order.len() - done);
        let size = chars(&whole[i]);
        if size <= share {
            left -= size;
            continue;
        }
        let a = &p.apps[i];
        out[i] = truncated(
            &a.app,
            &a.summary(),
            &a.diff_text(),
            share,
            p.page_url.as_deref(),
        );
        left = left.saturating_sub(chars(&out[i]));
    }
    out
}

/// An app's section cut to at most `share` characters, at a line boundary, saying so.
fn truncated(app: &str, summary: &str, diff: &str, share: usize, url: Option<&str>) -> String {
    let total_lines = diff.lines().count();
    let note_for = |shown: usize| {
        let more = total_lines - shown;
        match url {
            Some(url) => format!("diff truncated: {more} more lines in the [full preview]({url})"),
            None => format!("diff truncated: {more} more lines"),
        }
    };
    let empty = section(app, summary, "", Some(&note_for(0)));
    let room = share.saturating_sub(chars(&empty));
    let mut kept = String::new();
    let mut shown = 0;
    for line in diff.split_inclusive('\n') {
        if chars(&kept) + chars(line) > room {
            break;
        }
        kept.push_str(line);
        shown += 1;
    }
    if share < chars(&empty) {
        // Not even the summary fits: a line with the link is all there is room for.
        return format!("- `{app}`: {}\n", note_for(0));
    }
    section(app, summary, &kept, Some(&note_for(shown)))
}

fn section(app: &str, summary: &str, diff: &str, note: Option<&str>) -> String {
    // A fence inside a manifest would close the code block early.
    let diff = diff.replace("```", "` ` `");
    let note = note.map(|n| format!("\n_{n}_\n")).unwrap_or_default();
    format!(
        "<details><summary><code>{app}</code>: {}</summary>\n\n```diff\n{diff}```\n{note}</details>\n",
        html_text(summary)
    )
}

/// The comment once the request is closed or merged: the preview is gone.
fn render_closed(p: &PullRequestPreview) -> String {
    let what = if p.state == RequestState::Merged {
        "merged; driftless applies it from the push to the branch"
    } else {
        "closed without merging"
    };
    format!(
        "{MARKER}\n### driftless preview\n\nThis request was {what}. The preview of `{}` was dropped.\n",
        short(&p.head_sha)
    )
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn table_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn html_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview::diff::{ChangeKind, ObjectChange};
    use crate::preview::report::AppPreview;
    use crate::settings::ForgeKind;

    fn app(name: &str, lines: usize) -> AppPreview {
        let diff: String = (0..lines)
            .map(|i| format!("+  key{i}: value {i}\n"))
            .collect();
        AppPreview {
            app: name.into(),
            revision: "a".repeat(40),
            outcome: AppOutcome::Previewed,
            objects: vec![ObjectChange {
                object: format!("v1 ConfigMap demo/{name}"),
                source: "app/a.yaml".into(),
                change: ChangeKind::Changed,
                diff,
                note: None,
            }],
            unchanged: 0,
            prune: Vec::new(),
        }
    }

    fn preview(apps: Vec<AppPreview>) -> PullRequestPreview {
        PullRequestPreview {
            forge: ForgeKind::Github,
            repo: "acme/deploy".into(),
            number: 7,
            head_sha: "b".repeat(40),
            state: RequestState::Open,
            apps,
            not_previewed: Vec::new(),
            max_apps: 20,
            page_url: Some("https://d.example.com/previews/github/acme/deploy/7".into()),
        }
    }

    #[test]
    fn small_previews_are_whole() {
        let c = render(&preview(vec![app("web", 3)]), 65_536);
        assert!(c.starts_with(MARKER));
        assert!(
            c.contains("| `web` | changes | 1 changed, 0 added, 0 pruned |"),
            "{c}"
        );
        assert!(c.contains("+  key2: value 2"));
        assert!(!c.contains("truncated"));
    }

    #[test]
    fn large_previews_fit_the_limit_with_a_link_per_truncated_app() {
        for limit in [65_536, 10_000, 3_000] {
            let c = render(
                &preview(vec![app("big", 50_000), app("small", 2), app("mid", 4_000)]),
                limit,
            );
            assert!(chars(&c) <= limit, "{} > {limit}", chars(&c));
            assert!(
                c.contains("+  key1: value 1"),
                "small stays whole at {limit}"
            );
            assert!(c.contains("diff truncated:"), "{limit}");
            assert!(
                c.contains("[full preview](https://d.example.com/previews/github/acme/deploy/7)")
            );
        }
        let c = render(&preview(vec![app("big", 50_000), app("small", 2)]), 65_536);
        assert!(
            chars(&c) > 60_000,
            "the budget is used, not wasted: {}",
            chars(&c)
        );
    }

    #[test]
    fn closed_requests_say_so() {
        let mut p = preview(vec![app("web", 3)]);
        p.state = RequestState::Merged;
        let c = render(&p, 65_536);
        assert!(c.contains("merged") && !c.contains("key0"), "{c}");
    }
}

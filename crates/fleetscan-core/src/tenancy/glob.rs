//! The pattern language of exclusions, compiled once into a `globset::GlobSet`.
//!
//! A pattern has three wildcards and nothing else: `*`, `**` and `?`; every other character
//! (`[`, `{`, `,` and `\` included) stands for itself. In a path pattern `*` and `?` never match
//! a `/` and `**` matches any run of characters, `/` included; a path pattern also matches the
//! directories above what it names (see [`Patterns::paths`]). In a name pattern (images,
//! namespaces) `*` and `**` both match any run, `/` included, and `?` any one byte.
//!
//! globset reads more than that (classes, alternatives, escapes) and gives `**` a meaning of its
//! own (`a/**/b` matches `a/b` too, `a**b` stops at a `/`), so every pattern is rewritten in
//! globset's syntax with the meaning above before it is compiled:
//! - each character globset reads as syntax becomes a class of one (`[` is written `[[]`), and
//!   so does a final `.` (globset would match it by the text's file extension, which it does
//!   not see in a text that ends in `..`);
//! - a `**` of a path pattern becomes `{*,*/**/*}`: a run without `/`, or a run with a first
//!   and a last `/` around anything (globset's `/**/` is `/` alone or `/…/`); together, any run;
//! - "or one of its parent directories" is the same pattern followed by `/**`.
//!
//! The unit tests hold the rewriting against the matcher it replaced, pattern by pattern.
//!
//! It must never compile on the path of an access: [`Patterns`] is built when exclusions are
//! compiled, and only matched after.

use globset::{Candidate, Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Patterns compiled into one set, matched in one pass.
#[derive(Clone, Debug)]
pub(crate) struct Patterns {
    /// One set, unless the patterns are too many for one (see [`sets`]); each with, for each
    /// of its globs, the index of the pattern the glob was written from (a pattern may need
    /// several). Sets and globs are in the order of the patterns.
    sets: Vec<(GlobSet, Vec<usize>)>,
}

impl Patterns {
    /// Path patterns. A plain path (no `*` or `?`) matches itself and everything under it
    /// (`/var/log` matches `/var/log/x`, not `/var/logs`; `/` matches everything); a pattern
    /// with wildcards matches the path or one of its parent directories. The empty pattern
    /// matches nothing.
    pub(crate) fn paths(patterns: &[String]) -> Patterns {
        Patterns::new(patterns, true, path_globs)
    }

    /// Name patterns (images, namespaces): the whole name, exactly or by its wildcards.
    pub(crate) fn names(patterns: &[String]) -> Patterns {
        Patterns::new(patterns, false, |p| vec![rewrite(p, false)])
    }

    fn new(patterns: &[String], slashes: bool, globs: impl Fn(&str) -> Vec<String>) -> Patterns {
        let mut all = Vec::new();
        for (i, pattern) in patterns.iter().enumerate() {
            for glob in globs(pattern) {
                let glob = GlobBuilder::new(&glob)
                    .literal_separator(slashes)
                    .backslash_escape(false)
                    .build()
                    .expect("a rewritten pattern is valid glob syntax");
                all.push((glob, i));
            }
        }
        Patterns { sets: sets(all) }
    }

    /// The index of the first pattern, in the order given, that matches `text`.
    pub(crate) fn first_match(&self, text: &str) -> Option<usize> {
        if self.sets.is_empty() {
            return None;
        }
        let candidate = Candidate::new(text);
        self.sets.iter().find_map(|(set, origin)| {
            // Most accesses match nothing: one pass says so without allocating.
            if !set.is_match_candidate(&candidate) {
                return None;
            }
            set.matches_candidate(&candidate)
                .into_iter()
                .map(|glob| origin[glob])
                .min()
        })
    }
}

/// The globs compiled into sets: one, unless globset refuses it as too large for its size
/// limits (about 700 patterns of 200 characters with wildcards, or 1,500 of 60), then halves
/// until each is accepted. A glob refused alone has hundreds of thousands of characters, far
/// more than any path or name it could match, and matches nothing.
fn sets(globs: Vec<(Glob, usize)>) -> Vec<(GlobSet, Vec<usize>)> {
    split_until_built(globs, &|globs| {
        let mut builder = GlobSetBuilder::new();
        for (glob, _) in globs {
            builder.add(glob.clone());
        }
        builder.build().ok()
    })
}

fn split_until_built(
    globs: Vec<(Glob, usize)>,
    build: &impl Fn(&[(Glob, usize)]) -> Option<GlobSet>,
) -> Vec<(GlobSet, Vec<usize>)> {
    if globs.is_empty() {
        return Vec::new();
    }
    match build(&globs) {
        Some(set) => vec![(set, globs.into_iter().map(|(_, i)| i).collect())],
        None if globs.len() > 1 => {
            let mut first = globs;
            let second = first.split_off(first.len() / 2);
            let mut out = split_until_built(first, build);
            out.extend(split_until_built(second, build));
            out
        }
        None => Vec::new(),
    }
}

/// The globs of one path pattern (see [`Patterns::paths`]): the pattern itself, and the pattern
/// followed by `/**` for "a parent directory of the path matches".
fn path_globs(pattern: &str) -> Vec<String> {
    if pattern.is_empty() {
        return Vec::new();
    }
    if !pattern.contains(['*', '?']) {
        let prefix = pattern.trim_end_matches('/');
        if prefix.is_empty() {
            // "/" excludes everything (globset's lone `**` matches every string).
            return vec!["**".to_owned()];
        }
        let prefix = rewrite(prefix, true);
        return vec![format!("{prefix}/**"), prefix];
    }
    // Only a pattern of nothing but stars matches the empty string, which is no parent
    // directory (a path's parents are what precedes each of its `/` but the first character).
    if pattern.bytes().all(|b| b == b'*') {
        return if pattern.len() == 1 {
            // A name without `/`; a parent: a non-empty one.
            vec!["*".to_owned(), "?*/**".to_owned()]
        } else {
            vec!["**".to_owned()]
        };
    }
    let glob = rewrite(pattern, true);
    vec![format!("{glob}/**"), glob]
}

/// Writes `pattern` in globset's syntax with the meaning of the module header: `slashes` for a
/// path pattern, compiled with `literal_separator`.
fn rewrite(pattern: &str, slashes: bool) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {
                let mut run = 1;
                while chars.next_if_eq(&'*').is_some() {
                    run += 1;
                }
                // Two stars or more match any run; so does one star of a name pattern.
                if run == 1 || !slashes {
                    out.push('*');
                } else {
                    out.push_str("{*,*/**/*}");
                }
            }
            '[' | ']' | '{' | '}' | ',' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            // A final `.` as a class too: globset would otherwise match a pattern ending in
            // `.` by the text's extension, which it does not see in a text ending in `..`.
            '.' if chars.peek().is_none() => out.push_str("[.]"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pattern, compiled to match a whole path (`slashes`, no parent directories) or a
    /// name.
    fn whole(pattern: &str, slashes: bool) -> GlobSet {
        GlobSetBuilder::new()
            .add(
                GlobBuilder::new(&rewrite(pattern, slashes))
                    .literal_separator(slashes)
                    .backslash_escape(false)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    /// One pattern against one text (see [`whole`]).
    fn glob(pattern: &str, text: &str, slashes: bool) -> bool {
        whole(pattern, slashes).is_match(text)
    }

    impl Patterns {
        fn origin_count(&self) -> usize {
            self.sets.iter().map(|(_, origin)| origin.len()).sum()
        }
    }

    fn path_matches(pattern: &str, path: &str) -> bool {
        Patterns::paths(&[pattern.to_owned()])
            .first_match(path)
            .is_some()
    }

    #[test]
    fn globs() {
        assert!(glob("/a/*/c", "/a/b/c", true));
        assert!(!glob("/a/*/c", "/a/b/x/c", true));
        assert!(glob("/a/**/c", "/a/b/x/c", true));
        assert!(glob("/a/?", "/a/b", true));
        assert!(!glob("/a/?", "/a//", true));
        assert!(glob("img*", "img/x:1", false));
        assert!(!glob("abc", "abcd", false));
        assert!(glob("", "", true));
        // No exponential blow-up.
        let text = "a".repeat(200);
        assert!(!glob(&format!("{}b", "*a".repeat(60)), &text, true));
        // A glob excludes a directory and what is under it.
        assert!(path_matches("/srv/*/tmp", "/srv/app/tmp/file"));
        assert!(path_matches("/", "/anything"));
    }

    #[test]
    fn the_first_matching_pattern_is_named_whatever_globset_matched_first() {
        let p = Patterns::paths(&[
            "/srv/*.log".to_owned(),
            "/srv".to_owned(),
            "/srv/**".to_owned(),
        ]);
        assert_eq!(p.first_match("/srv/a.log"), Some(0));
        assert_eq!(p.first_match("/srv/a/b"), Some(1));
        assert_eq!(p.first_match("/other"), None);
        assert_eq!(Patterns::paths(&[]).first_match("/x"), None);
        let n = Patterns::names(&["kube-*".to_owned(), "kube-system".to_owned()]);
        assert_eq!(n.first_match("kube-system"), Some(0));
        assert_eq!(n.first_match("kube"), None);
    }

    #[test]
    fn patterns_too_many_for_one_set_are_split_and_keep_their_order() {
        let patterns: Vec<String> = (0..10).map(|i| format!("/x{i}/*")).collect();
        let mut globs = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            for g in path_globs(p) {
                let glob = GlobBuilder::new(&g).literal_separator(true).build();
                globs.push((glob.unwrap(), i));
            }
        }
        // As if globset refused sets of more than three globs, and the sixth glob alone.
        let sixth = globs[5].0.clone();
        let p = Patterns {
            sets: split_until_built(globs, &|globs| {
                let refused = globs.len() > 3 || globs[0].0 == sixth;
                (!refused).then(|| {
                    let mut b = GlobSetBuilder::new();
                    globs.iter().for_each(|(g, _)| {
                        b.add(g.clone());
                    });
                    b.build().unwrap()
                })
            }),
        };
        assert!(p.sets.len() > 3, "{} sets", p.sets.len());
        assert_eq!(p.origin_count(), 19, "only the glob refused alone is lost");
        for i in [0, 3, 9] {
            assert_eq!(p.first_match(&format!("/x{i}/a/b")), Some(i));
        }
        // The pattern of the lost glob (`/x2/*` itself) still matches below by its other one.
        assert_eq!(p.first_match("/x2/a/b"), Some(2));
        assert_eq!(p.first_match("/x2/a"), None);
        assert_eq!(p.first_match("/y/a"), None);
    }

    #[test]
    fn globset_syntax_stands_for_itself() {
        assert!(glob("/a[b]", "/a[b]", true));
        assert!(!glob("/a[b]", "/ab", true));
        assert!(glob("{a,b}", "{a,b}", false));
        assert!(!glob("{a,b}", "a", false));
        assert!(glob("a\\*", "a\\xyz", false));
        assert!(glob("[!x]", "[!x]", false));
        assert!(path_matches("/data[1]", "/data[1]/x"));
        assert!(!path_matches("/data[1]", "/data1/x"));
    }

    #[test]
    fn double_stars_keep_their_meaning_where_globset_differs() {
        // globset alone: `/srv/**/x` matches `/srv/x`; here `**` sits between two slashes.
        assert!(!glob("/srv/**/x", "/srv/x", true));
        assert!(glob("/srv/**/x", "/srv//x", true));
        // globset alone: `a**b` stops at a slash; here it crosses it.
        assert!(glob("/a**b", "/a/x/b", true));
        assert!(glob("**.log", "/var/log/x.log", true));
        assert!(glob("/a/***", "/a/b/c", true));
        // A lone star names no parent directory by matching the empty string.
        assert!(!path_matches("*", "/x"));
        assert!(path_matches("*", "x/y"));
        assert!(path_matches("**", "/x"));
    }

    /// The matcher this module replaced, kept as the reference the rewriting is checked against:
    /// dynamic programming over pattern and text positions.
    fn reference(pattern: &str, text: &str, slashes: bool) -> bool {
        #[derive(Clone, Copy)]
        enum Tok {
            Byte(u8),
            One,
            Star,
            DoubleStar,
        }
        let p = pattern.as_bytes();
        let mut toks = Vec::with_capacity(p.len());
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                b'*' if p.get(i + 1) == Some(&b'*') => {
                    toks.push(Tok::DoubleStar);
                    i += 2;
                }
                b'*' => {
                    toks.push(if slashes { Tok::Star } else { Tok::DoubleStar });
                    i += 1;
                }
                b'?' => {
                    toks.push(Tok::One);
                    i += 1;
                }
                b => {
                    toks.push(Tok::Byte(b));
                    i += 1;
                }
            }
        }
        let t = text.as_bytes();
        let mut matches = vec![false; t.len() + 1];
        matches[0] = true;
        for tok in toks {
            let mut next = vec![false; t.len() + 1];
            match tok {
                Tok::Star | Tok::DoubleStar => {
                    for j in 0..=t.len() {
                        next[j] = matches[j]
                            || (j > 0
                                && next[j - 1]
                                && (matches!(tok, Tok::DoubleStar) || t[j - 1] != b'/'));
                    }
                }
                Tok::One => {
                    for j in 1..=t.len() {
                        next[j] = matches[j - 1] && !(slashes && t[j - 1] == b'/');
                    }
                }
                Tok::Byte(b) => {
                    for j in 1..=t.len() {
                        next[j] = matches[j - 1] && t[j - 1] == b;
                    }
                }
            }
            matches = next;
        }
        matches[t.len()]
    }

    /// The reference's path rule: a plain path excludes itself and what is under it; a pattern
    /// matches the path or one of its parent directories.
    fn reference_path(pattern: &str, path: &str) -> bool {
        if pattern.is_empty() {
            return false;
        }
        if !pattern.contains(['*', '?']) {
            let prefix = pattern.trim_end_matches('/');
            if prefix.is_empty() {
                return true;
            }
            return path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'));
        }
        reference(pattern, path, true)
            || path
                .match_indices('/')
                .filter(|(i, _)| *i > 0)
                .any(|(i, _)| reference(pattern, &path[..i], true))
    }

    /// Every pattern of up to three characters and text of up to two over alphabets of
    /// wildcards, slashes, dots, globset's syntax and plain letters, and a random sample of
    /// longer ones, mean the same to globset, rewritten, as to the reference.
    #[test]
    fn the_rewritten_patterns_match_exactly_what_the_reference_matches() {
        const PATTERN: &[char] = &['a', '/', '*', '?', '[', '{', ',', '\\', '.', 'é'];
        const TEXT: &[char] = &['a', 'b', '/', '[', '{', ',', '\\', '.', 'é', '\n'];
        fn all(alphabet: &[char], max: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                let next: Vec<String> = last
                    .iter()
                    .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                    .collect();
                out.extend(next.iter().cloned());
                last = next;
            }
            out
        }
        // A xorshift stream: deterministic, so a failure repeats.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = |alphabet: &[char], len: usize| -> String {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect()
        };
        let mut patterns = all(PATTERN, 3);
        let mut texts = all(TEXT, 2);
        for len in 3..10 {
            patterns.extend((0..40).map(|_| random(PATTERN, len)));
            texts.extend((0..25).map(|_| random(TEXT, len)));
        }
        for pattern in &patterns {
            let one = std::slice::from_ref(pattern);
            let (paths, names) = (Patterns::paths(one), Patterns::names(one));
            let whole_path = whole(pattern, true);
            for text in &texts {
                assert_eq!(
                    paths.first_match(text).is_some(),
                    reference_path(pattern, text),
                    "path pattern {pattern:?} on {text:?}"
                );
                assert_eq!(
                    names.first_match(text).is_some(),
                    reference(pattern, text, false),
                    "name pattern {pattern:?} on {text:?}"
                );
                assert_eq!(
                    whole_path.is_match(text),
                    reference(pattern, text, true),
                    "whole-path pattern {pattern:?} on {text:?}"
                );
            }
        }
    }
}

//! Accesses a policy never scans: [`Exclusions`] as configured and sent to agents, and
//! [`CompiledExclusions`], the same rules compiled once for matching on every access.
//!
//! It must never compile patterns per access: only [`CompiledExclusions`] matches, and its
//! holders ([`super::EffectivePolicy`], the agent's scopes) compile once when the rules arrive.
//! An access a rule cannot judge (no image, no namespace) is never excluded by it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::glob::Patterns;

/// Accesses that are never scanned: allowed at once, by the agent where it can.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Exclusions {
    /// Paths as the opening process sees them. A plain path excludes itself and everything
    /// under it (`/var/log` excludes `/var/log/x`, not `/var/logs`); a pattern with `*`, `?`
    /// or `**` matches the path or one of its parent directories, `*` and `?` never across a
    /// `/`, `**` across any number of them.
    pub paths: Vec<String>,
    /// Container images as the runtime reports them, exactly or by a pattern (`*` matches any
    /// run of characters, `/` included).
    pub images: Vec<String>,
    /// Kubernetes namespaces, exactly or by a pattern.
    pub namespaces: Vec<String>,
}

impl Exclusions {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.images.is_empty() && self.namespaces.is_empty()
    }

    /// The rules compiled for matching; compile once and keep the result.
    pub fn compile(&self) -> CompiledExclusions {
        CompiledExclusions {
            rules: self.clone(),
            matchers: Arc::new(Matchers {
                paths: Patterns::paths(&self.paths),
                images: Patterns::names(&self.images),
                namespaces: Patterns::names(&self.namespaces),
            }),
        }
    }
}

/// [`Exclusions`] compiled for matching (see [`Exclusions::compile`]); cheap to clone.
#[derive(Clone, Default)]
pub struct CompiledExclusions {
    rules: Exclusions,
    matchers: Arc<Matchers>,
}

struct Matchers {
    paths: Patterns,
    images: Patterns,
    namespaces: Patterns,
}

impl Default for Matchers {
    fn default() -> Self {
        Matchers {
            paths: Patterns::paths(&[]),
            images: Patterns::names(&[]),
            namespaces: Patterns::names(&[]),
        }
    }
}

impl CompiledExclusions {
    /// The rules as configured.
    pub fn rules(&self) -> &Exclusions {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Why the access is excluded, or `None` when it must be scanned. Empty `image` and
    /// `namespace` (a host process, or one not attributed) match no image or namespace rule.
    pub fn excludes(&self, path: &str, image: &str, namespace: &str) -> Option<String> {
        self.excludes_path(path)
            .or_else(|| self.excludes_origin(image, namespace))
    }

    /// The path rules alone (an agent judges them once it has the opener's view of the path).
    pub fn excludes_path(&self, path: &str) -> Option<String> {
        let i = self.matchers.paths.first_match(path)?;
        Some(format!("excluded path {}", self.rules.paths[i]))
    }

    /// The image and namespace rules alone (judged before the path is known).
    pub fn excludes_origin(&self, image: &str, namespace: &str) -> Option<String> {
        if !image.is_empty()
            && let Some(i) = self.matchers.images.first_match(image)
        {
            return Some(format!("excluded image {}", self.rules.images[i]));
        }
        if !namespace.is_empty()
            && let Some(i) = self.matchers.namespaces.first_match(namespace)
        {
            return Some(format!("excluded namespace {}", self.rules.namespaces[i]));
        }
        None
    }
}

impl From<Exclusions> for CompiledExclusions {
    fn from(rules: Exclusions) -> Self {
        rules.compile()
    }
}

/// Two compilations are equal when their rules are.
impl PartialEq for CompiledExclusions {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules
    }
}

impl Eq for CompiledExclusions {}

/// The rules; the compiled sets say nothing more.
impl std::fmt::Debug for CompiledExclusions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.rules.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Exclusions {
        Exclusions {
            paths: vec!["/cache".into(), "/srv/**/*.log".into()],
            images: vec!["registry.acme/ci-*".into()],
            namespaces: vec!["kube-*".into()],
        }
    }

    #[test]
    fn the_compiled_rules_answer_by_path_image_and_namespace() {
        let plain = rules();
        let compiled = plain.compile();
        for (path, image, namespace, want) in [
            ("/cache/x", "", "", Some("excluded path /cache")),
            ("/cachex", "", "", None),
            (
                "/srv/a/b/app.log",
                "",
                "",
                Some("excluded path /srv/**/*.log"),
            ),
            ("/srv/app.logx", "", "", None),
            (
                "/bin/sh",
                "registry.acme/ci-runner:1",
                "",
                Some("excluded image registry.acme/ci-*"),
            ),
            (
                "/bin/sh",
                "registry.acme/app:1",
                "kube-system",
                Some("excluded namespace kube-*"),
            ),
            ("/bin/sh", "", "", None),
        ] {
            assert_eq!(
                compiled.excludes(path, image, namespace).as_deref(),
                want,
                "{path} {image} {namespace}"
            );
        }
        assert_eq!(
            compiled.excludes_origin("", "kube-system").as_deref(),
            Some("excluded namespace kube-*")
        );
        assert_eq!(compiled, plain.clone().into());
        assert_eq!(compiled.rules(), &plain);
        assert!(CompiledExclusions::default().is_empty());
        assert_eq!(CompiledExclusions::default().excludes("/x", "i", "n"), None);
    }
}

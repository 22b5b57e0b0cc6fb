//! Segment-wise longest-prefix matching of requests to routes (spec §2.3, with its bug fixed).
//!
//! Routes live in a trie keyed by normalised path segments. A lookup walks down the trie as far
//! as the request path goes and remembers the deepest node that has a route for the request's
//! host, so falling back to a shorter prefix (which v2 did not do) costs nothing extra: no stack
//! of visited nodes, no allocation, no locks. A [`Router`] is immutable once built; a new
//! snapshot builds a new one and swaps it in.

use std::collections::HashMap;

use crate::route::path::{normalize, segments};

/// Below this many children a node scans a slice instead of hashing: comparing a few short
/// segments is cheaper than hashing one, and most trie nodes have a single child.
const MAX_SCANNED_CHILDREN: usize = 8;

/// The hasher of a wide node's children. The keys are the operator's route segments; a request
/// only looks up, so it cannot lengthen a probe sequence, and the seed is random per process.
/// With SipHash (the std default), lookups in a 10 000-route table took 3–18 ns more
/// (`cargo bench --bench router`, 10 000 routes: 98.4 → 94.9 ns to a virtual host's route,
/// 74.2 → 56.1 ns backtracking past one, 13.0 → 10.3 ns for a miss).
type SegmentHash = foldhash::fast::RandomState;

/// An immutable route table: maps a request's host and raw path to the route that serves it.
#[derive(Debug)]
pub struct Router<T> {
    root: Node<T>,
    len: usize,
}

/// Collects routes, rejecting duplicates, and freezes them into a [`Router`].
#[derive(Debug)]
pub struct RouterBuilder<T> {
    root: BuildNode<T>,
    len: usize,
}

/// Why a route could not be added.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Another route already serves this path for this virtual host; the first one is kept so
    /// that a later, conflicting object cannot take over traffic.
    #[error(
        "a route for path {path} on {} already exists",
        .virtual_host.as_deref().unwrap_or("every host")
    )]
    Duplicate {
        /// The normalised path of the rejected route.
        path: String,
        /// The rejected route's virtual host; `None` means every host.
        virtual_host: Option<String>,
    },
}

/// The routes attached to one trie node.
#[derive(Debug)]
struct Routes<T> {
    any_host: Option<T>,
    /// Few entries per path in practice, so a scan beats a map and needs no lowercased copy of
    /// the request host.
    by_host: Vec<(Box<str>, T)>,
}

impl<T> Routes<T> {
    fn new() -> Self {
        Routes {
            any_host: None,
            by_host: Vec::new(),
        }
    }

    /// The route at this node for `host`: a host-specific route beats the host-agnostic one.
    fn for_host(&self, host: Option<&str>) -> Option<&T> {
        if let Some(host) = host {
            for (virtual_host, value) in &self.by_host {
                if virtual_host.eq_ignore_ascii_case(host) {
                    return Some(value);
                }
            }
        }
        self.any_host.as_ref()
    }
}

#[derive(Debug)]
struct Node<T> {
    routes: Routes<T>,
    children: Children<T>,
}

#[derive(Debug)]
enum Children<T> {
    Scanned(Box<[(Box<str>, Node<T>)]>),
    Hashed(HashMap<Box<str>, Node<T>, SegmentHash>),
}

impl<T> Children<T> {
    fn get(&self, segment: &str) -> Option<&Node<T>> {
        match self {
            Children::Scanned(children) => children
                .iter()
                .find(|(name, _)| **name == *segment)
                .map(|(_, node)| node),
            Children::Hashed(children) => children.get(segment),
        }
    }
}

#[derive(Debug)]
struct BuildNode<T> {
    routes: Routes<T>,
    children: HashMap<Box<str>, BuildNode<T>, SegmentHash>,
}

impl<T> BuildNode<T> {
    fn new() -> Self {
        BuildNode {
            routes: Routes::new(),
            children: HashMap::default(),
        }
    }

    /// The child for `segment`, added if missing. Routes share their first segments, so most
    /// calls find it: the key is allocated only when it is new.
    fn child(&mut self, segment: &str) -> &mut BuildNode<T> {
        if !self.children.contains_key(segment) {
            self.children.insert(Box::from(segment), BuildNode::new());
        }
        match self.children.get_mut(segment) {
            Some(child) => child,
            None => unreachable!("inserted above"),
        }
    }

    /// Freezes this subtree. Recursion depth is the depth of the deepest route path.
    fn build(self) -> Node<T> {
        let hashed = self.children.len() > MAX_SCANNED_CHILDREN;
        let children = self
            .children
            .into_iter()
            .map(|(segment, child)| (segment, child.build()));
        let children = if hashed {
            Children::Hashed(children.collect())
        } else {
            Children::Scanned(children.collect())
        };
        let mut routes = self.routes;
        routes.by_host.shrink_to_fit();
        Node { routes, children }
    }
}

impl<T> RouterBuilder<T> {
    /// An empty builder.
    pub fn new() -> Self {
        RouterBuilder {
            root: BuildNode::new(),
            len: 0,
        }
    }

    /// Adds a route.
    ///
    /// `path` is a normalised route path (spec §2.2; it is split into segments the same way, so
    /// an un-normalised path behaves like its normal form). `virtual_host` is `host[:port]` and
    /// matches the request authority ASCII-case-insensitively, port included; `None` serves
    /// every host. Adding the same path and virtual host twice fails and keeps the first value.
    pub fn insert(
        &mut self,
        path: &str,
        virtual_host: Option<&str>,
        value: T,
    ) -> Result<(), RouterError> {
        let mut node = &mut self.root;
        for segment in segments(path) {
            node = node.child(segment);
        }
        let routes = &mut node.routes;
        let taken = match virtual_host {
            None => routes.any_host.is_some(),
            Some(host) => routes
                .by_host
                .iter()
                .any(|(existing, _)| existing.eq_ignore_ascii_case(host)),
        };
        if taken {
            return Err(RouterError::Duplicate {
                path: normalize(path),
                virtual_host: virtual_host.map(str::to_owned),
            });
        }
        match virtual_host {
            None => routes.any_host = Some(value),
            Some(host) => routes.by_host.push((Box::from(host), value)),
        }
        self.len += 1;
        Ok(())
    }

    /// Freezes the routes into a [`Router`].
    pub fn build(self) -> Router<T> {
        Router {
            root: self.root.build(),
            len: self.len,
        }
    }
}

impl<T> Default for RouterBuilder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Router<T> {
    /// The route for a request, or `None` (Kanali error 00).
    ///
    /// `path` is the request's raw (escaped, un-normalised) path; `host` is the request
    /// authority as sent, port included, or `None` if the request had none (then only
    /// host-agnostic routes match). The route with the longest matching segment prefix that
    /// serves this host wins, a host-specific route beating a host-agnostic one on the same path.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&T> {
        let mut node = &self.root;
        let mut best = node.routes.for_host(host);
        for segment in segments(path) {
            match node.children.get(segment) {
                Some(child) => node = child,
                None => break,
            }
            if let Some(value) = node.routes.for_host(host) {
                best = Some(value);
            }
        }
        best
    }

    /// The number of routes (path and virtual host pairs).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no routes, i.e. every request gets error 00.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Default for Router<T> {
    /// The empty router, for before the first snapshot arrives.
    fn default() -> Self {
        RouterBuilder::new().build()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn router(routes: &[(&'static str, Option<&'static str>)]) -> Router<String> {
        let mut builder = RouterBuilder::new();
        for (path, host) in routes {
            let name = match host {
                Some(host) => format!("{path}@{host}"),
                None => (*path).to_owned(),
            };
            builder.insert(path, *host, name).unwrap();
        }
        builder.build()
    }

    fn check(router: &Router<String>, host: Option<&str>, path: &str, want: Option<&str>) {
        assert_eq!(
            router.lookup(host, path).map(String::as_str),
            want,
            "lookup({host:?}, {path:?})"
        );
    }

    #[test]
    fn empty_router_matches_nothing() {
        let r = router(&[]);
        assert!(r.is_empty());
        assert_eq!(r.len(), 0);
        check(&r, None, "/", None);
        check(&r, Some("a.example"), "/foo", None);
        assert!(Router::<()>::default().is_empty());
    }

    #[test]
    fn matching_is_segment_wise() {
        let r = router(&[("/api", None)]);
        assert_eq!(r.len(), 1);
        for path in ["/api", "/api/", "/api/x/y", "//api//x", "api"] {
            check(&r, None, path, Some("/api"));
        }
        for path in ["/apis", "/ap", "/", "", "/x/api", "/API"] {
            check(&r, None, path, None);
        }
    }

    #[test]
    fn longest_prefix_with_backtracking() {
        let r = router(&[("/foo", None), ("/foo/bar/baz", None)]);
        check(&r, None, "/foo/bar/qux", Some("/foo"));
        check(&r, None, "/foo/bar", Some("/foo"));
        check(&r, None, "/foo/bar/", Some("/foo"));
        check(&r, None, "/foo/bar/baz", Some("/foo/bar/baz"));
        check(&r, None, "/foo/bar/baz/x", Some("/foo/bar/baz"));
        check(&r, None, "/foo//bar///baz//x/", Some("/foo/bar/baz"));
        check(&r, None, "/foobar", None);
    }

    #[test]
    fn root_route_matches_every_path() {
        let r = router(&[("/", None), ("/api/v1", None)]);
        check(&r, None, "/", Some("/"));
        check(&r, None, "", Some("/"));
        check(&r, None, "/zzz", Some("/"));
        // v2 returned 00 here: the walk entered the value-less `api` subtree.
        check(&r, None, "/api", Some("/"));
        check(&r, None, "/api/zzz", Some("/"));
        check(&r, None, "/api/v1/a/b/c/d/e/f/g", Some("/api/v1"));
        check(&r, None, "/api/v2/a/b/c/d/e/f/g", Some("/"));
        check(&r, Some("any.example"), "/a/b/c/d/e/f/g/h/i/j", Some("/"));
    }

    #[test]
    fn virtual_host_beats_global_on_the_same_path() {
        let r = router(&[("/api", None), ("/api", Some("api.example.org"))]);
        assert_eq!(r.len(), 2);
        check(
            &r,
            Some("api.example.org"),
            "/api/x",
            Some("/api@api.example.org"),
        );
        check(
            &r,
            Some("API.Example.ORG"),
            "/api",
            Some("/api@api.example.org"),
        );
        check(&r, Some("other.example.org"), "/api/x", Some("/api"));
        check(&r, None, "/api/x", Some("/api"));
        // The port is part of the host and must match exactly.
        check(&r, Some("api.example.org:8080"), "/api", Some("/api"));
        check(&r, Some("api.example.org."), "/api", Some("/api"));
    }

    #[test]
    fn virtual_host_with_port() {
        let r = router(&[("/api", Some("api.example.org:8080"))]);
        check(
            &r,
            Some("api.example.org:8080"),
            "/api",
            Some("/api@api.example.org:8080"),
        );
        check(
            &r,
            Some("API.EXAMPLE.ORG:8080"),
            "/api",
            Some("/api@api.example.org:8080"),
        );
        check(&r, Some("api.example.org"), "/api", None);
        check(&r, Some("api.example.org:80"), "/api", None);
        check(&r, None, "/api", None);
    }

    #[test]
    fn node_with_only_other_hosts_falls_back_to_shorter_prefix() {
        let r = router(&[
            ("/", None),
            ("/api", None),
            ("/api/v1", Some("a.example")),
            ("/api/v1/users", Some("b.example")),
            ("/admin", Some("a.example")),
        ]);
        check(
            &r,
            Some("a.example"),
            "/api/v1/users/7",
            Some("/api/v1@a.example"),
        );
        check(
            &r,
            Some("b.example"),
            "/api/v1/users/7",
            Some("/api/v1/users@b.example"),
        );
        check(&r, Some("b.example"), "/api/v1/x", Some("/api"));
        check(&r, Some("c.example"), "/api/v1/users/7", Some("/api"));
        check(&r, None, "/api/v1/users/7", Some("/api"));
        check(&r, Some("a.example"), "/admin/x", Some("/admin@a.example"));
        check(&r, Some("b.example"), "/admin/x", Some("/"));
        check(&r, None, "/admin", Some("/"));
    }

    #[test]
    fn multiple_virtual_hosts_on_one_path() {
        let r = router(&[
            ("/x", Some("a.example")),
            ("/x", Some("b.example")),
            ("/x", Some("c.example")),
        ]);
        check(&r, Some("a.example"), "/x", Some("/x@a.example"));
        check(&r, Some("B.example"), "/x", Some("/x@b.example"));
        check(&r, Some("c.example"), "/x/y", Some("/x@c.example"));
        check(&r, Some("d.example"), "/x", None);
    }

    #[test]
    fn segments_compare_escapes_byte_exactly() {
        let r = router(&[("/a%2Fb", None), ("/a", None)]);
        check(&r, None, "/a%2Fb", Some("/a%2Fb"));
        check(&r, None, "/a%2Fb/c", Some("/a%2Fb"));
        check(&r, None, "/a/b", Some("/a"));
        // Escapes are not decoded or case-folded.
        check(&r, None, "/a%2fb", None);
        check(&r, None, "/a%2Fc", None);
        let r = router(&[("/https%3A%2F%2Fgoogle.com", None)]);
        check(
            &r,
            None,
            "/////https%3A%2F%2Fgoogle.com",
            Some("/https%3A%2F%2Fgoogle.com"),
        );
    }

    #[test]
    fn duplicate_insert_is_rejected_and_keeps_the_first_value() {
        let mut builder = RouterBuilder::new();
        builder.insert("/foo", None, 1).unwrap();
        builder.insert("/foo", Some("a.example"), 2).unwrap();
        let err = builder.insert("/foo", None, 3).unwrap_err();
        assert!(
            matches!(&err, RouterError::Duplicate { path, virtual_host: None } if path == "/foo")
        );
        assert_eq!(
            err.to_string(),
            "a route for path /foo on every host already exists"
        );
        let err = builder.insert("foo/", Some("A.Example"), 4).unwrap_err();
        match &err {
            RouterError::Duplicate { path, virtual_host } => {
                assert_eq!(path, "/foo");
                assert_eq!(virtual_host.as_deref(), Some("A.Example"));
            }
        }
        assert_eq!(
            err.to_string(),
            "a route for path /foo on A.Example already exists"
        );
        builder.insert("/foo", Some("a.example:81"), 5).unwrap();
        builder.insert("/", None, 6).unwrap();
        assert!(builder.insert("", None, 7).is_err());
        let r = builder.build();
        assert_eq!(r.len(), 4);
        assert_eq!(r.lookup(None, "/foo"), Some(&1));
        assert_eq!(r.lookup(Some("a.example"), "/foo"), Some(&2));
        assert_eq!(r.lookup(Some("a.example:81"), "/foo"), Some(&5));
        assert_eq!(r.lookup(None, "/"), Some(&6));
    }

    #[test]
    fn wide_nodes_use_the_hashed_children_and_still_match() {
        let mut builder = RouterBuilder::new();
        let n = MAX_SCANNED_CHILDREN * 4;
        for i in 0..n {
            builder
                .insert(&format!("/svc-{i}/resource"), None, i)
                .unwrap();
        }
        builder.insert("/svc-3", None, usize::MAX).unwrap();
        let r = builder.build();
        assert!(matches!(r.root.children, Children::Hashed(_)));
        for i in 0..n {
            assert_eq!(r.lookup(None, &format!("/svc-{i}/resource/x")), Some(&i));
        }
        assert_eq!(r.lookup(None, "/svc-3/other"), Some(&usize::MAX));
        assert_eq!(r.lookup(None, "/svc-4/other"), None);
        assert_eq!(r.lookup(None, &format!("/svc-{n}/resource")), None);
    }

    #[test]
    fn router_is_send_and_sync() {
        fn assert_send_sync<X: Send + Sync>() {}
        assert_send_sync::<Router<String>>();
        assert_send_sync::<RouterBuilder<String>>();
    }
}

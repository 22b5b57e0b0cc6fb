//! Validation and normalisation of the paths and hosts written in resources.

/// Validates a path as written in a resource (`source.path`, `target.path`, mock routes) and
/// returns its normalised form: leading `/`, runs of `/` collapsed, no trailing `/` (except for
/// `/` itself). Percent-escapes are kept as written, because requests are matched on their
/// escaped form.
pub fn normalize_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return Err(format!(
                    "path {path:?} has a '%' that does not start a %XX escape"
                ));
            }
            i += 3;
            continue;
        }
        if !is_path_byte(b) {
            let shown = path[i..].chars().next().unwrap_or('?');
            return Err(format!(
                "path {path:?} contains {shown:?}, which is not allowed in a URL path (percent-encode it)"
            ));
        }
        i += 1;
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(format!("path {path:?} contains a '.' or '..' segment"));
    }
    Ok(format!("/{}", segments.join("/")))
}

/// RFC 3986 `pchar` plus `/`, minus `%` (handled by the caller).
fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

/// Validates a virtual host (`host` or `host:port`) and returns it lowercased: host names are
/// case-insensitive, so `API.example.org` and `api.example.org` must be the same route.
pub fn normalize_host(host: &str) -> Result<String, String> {
    let invalid = |why: &str| {
        Err(format!(
            "virtualHost {host:?} is not a valid host[:port]: {why}"
        ))
    };
    if host.is_empty() {
        return invalid("it is empty");
    }
    if host.contains('*') {
        return invalid("wildcards are not supported; list each host in its own ApiProxy");
    }
    if host.contains(['/', '@', '?', '#']) || host.chars().any(|c| c.is_whitespace()) {
        return invalid("it must not contain a scheme, path, user info or spaces");
    }
    let authority: http::uri::Authority = match host.parse() {
        Ok(a) => a,
        Err(e) => return invalid(&e.to_string()),
    };
    if host.contains(':') && authority.port_u16().is_none() && !host.ends_with(']') {
        return invalid("the port must be a number from 0 to 65535");
    }
    Ok(host.to_ascii_lowercase())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn normalises_like_the_v2_store() {
        for (input, want) in [
            ("/", "/"),
            ("////", "/"),
            ("/foo////bar", "/foo/bar"),
            ("/foo/", "/foo"),
            ("///foo////bar//", "/foo/bar"),
            ("/https%3A%2F%2Fgoogle.com", "/https%3A%2F%2Fgoogle.com"),
            ("/api/v1:batch@x", "/api/v1:batch@x"),
        ] {
            assert_eq!(normalize_path(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_paths_that_cannot_match_a_request() {
        for bad in [
            "", "foo", "/a b", "/a?b", "/a#b", "/a%zz", "/a%2", "/a/../b", "/ä",
        ] {
            let err = normalize_path(bad).unwrap_err();
            assert!(err.contains("path"), "{bad}: {err}");
        }
    }

    #[test]
    fn spec_2_2_table() {
        // `""` normalises to `/` in v2, but a resource path must start with `/`.
        for (input, want) in [
            (
                "/////https%3A%2F%2Fgoogle.com",
                Ok("/https%3A%2F%2Fgoogle.com"),
            ),
            ("////", Ok("/")),
            ("/a//b/", Ok("/a/b")),
            ("/a/b///", Ok("/a/b")),
            ("/a/%2F/b", Ok("/a/%2F/b")),
            ("/%2e%2E", Ok("/%2e%2E")),
            ("/A/Case", Ok("/A/Case")),
            ("/-._~!$&'()*+,;=:@", Ok("/-._~!$&'()*+,;=:@")),
            ("/a.b/..c/...", Ok("/a.b/..c/...")),
            ("", Err(())),
        ] {
            assert_eq!(
                normalize_path(input).map_err(|_| ()),
                want.map(str::to_owned),
                "{input}"
            );
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for input in ["/", "//a//b/", "/x%2Fy/", "/a/b:c@d"] {
            let once = normalize_path(input).unwrap();
            assert_eq!(normalize_path(&once).as_deref(), Ok(once.as_str()));
        }
    }

    #[test]
    fn rejection_messages_say_why() {
        let why = |p: &str| normalize_path(p).unwrap_err();
        assert!(why("foo").contains("must start with '/'"));
        assert!(why("/a%zz").contains("%XX"));
        assert!(why("/a%").contains("%XX"));
        assert!(why("/a b").contains("' '"));
        assert!(why("/ä").contains("'ä'"));
        assert!(why("/a/./b").contains("'.' or '..'"));
        assert!(why("/..").contains("'.' or '..'"));
        assert!(why("/a\\b").contains("not allowed"));
    }

    #[test]
    fn hosts_keep_ports_and_ip_literals() {
        for (input, want) in [
            ("example.org", "example.org"),
            ("EXAMPLE.org:80", "example.org:80"),
            ("10.0.0.1:8080", "10.0.0.1:8080"),
            ("[::1]", "[::1]"),
            ("[::1]:8443", "[::1]:8443"),
            ("localhost", "localhost"),
        ] {
            assert_eq!(normalize_host(input).as_deref(), Ok(want), "{input}");
        }
        for bad in [
            "x:", "x:abc", "[::1]:x", "[::1", "a:b:c", "x?y", "x#y", " x", "*",
        ] {
            let err = normalize_host(bad).unwrap_err();
            assert!(err.contains("virtualHost"), "{bad}: {err}");
        }
    }

    #[test]
    fn hosts_are_lowercased_and_validated() {
        assert_eq!(
            normalize_host("API.Example.org").as_deref(),
            Ok("api.example.org")
        );
        assert_eq!(
            normalize_host("api.example.org:8443").as_deref(),
            Ok("api.example.org:8443")
        );
        for bad in [
            "",
            "*.example.org",
            "http://x",
            "a b",
            "x:99999",
            "u@x",
            "x/y",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
    }
}

//! Dynamic Services (spec §1.7): the Service is chosen per request by labels whose values are
//! literals or come from request headers.
//!
//! The controller ships the candidates (the namespace's Services whose fixed-value labels
//! already match, sorted by name) with their labels; the proxy only compares strings. A value
//! that is not a valid Kubernetes label value matches nothing — v2 built an empty selector from
//! it, which matched every Service in the namespace.

use http::{HeaderMap, HeaderName};
use kanali_proto::v1 as pb;

/// Response header that says how many Services matched when it was more than one.
pub static X_KANALI_SERVICE_CARDINALITY: HeaderName =
    HeaderName::from_static("x-kanali-service-cardinality");

/// Label values held inline per request; more labels than this spill to the heap.
const INLINE_LABELS: usize = 8;

/// Header values a proxy uses when a request lacks the header (`--default-header-value`).
#[derive(Clone, Debug, Default)]
pub struct HeaderDefaults(Vec<(String, String)>);

impl HeaderDefaults {
    /// Defaults by header name; names compare case-insensitively, the last one given wins.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        HeaderDefaults(
            pairs
                .into_iter()
                .map(|(name, value)| (name.to_ascii_lowercase(), value))
                .collect(),
        )
    }

    /// The default for `header`, if one was given.
    pub fn get(&self, header: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| name.eq_ignore_ascii_case(header))
            .map(|(_, value)| value.as_str())
    }
}

/// Where one label's value comes from.
#[derive(Debug)]
enum LabelSource {
    Value(Box<str>),
    Header { name: HeaderName, default: Box<str> },
}

#[derive(Debug)]
struct Candidate<T> {
    /// The candidate's value of each route label, in the route's label order; `None`: the
    /// Service does not have that label.
    values: Box<[Option<Box<str>>]>,
    target: T,
}

/// One dynamic-Service route, ready to choose per request.
#[derive(Debug)]
pub struct DynamicService<T> {
    labels: Box<[LabelSource]>,
    candidates: Box<[Candidate<T>]>,
}

/// The Service chosen for a request.
#[derive(Debug)]
pub struct Selection<'a, T> {
    /// The first match by name.
    pub target: &'a T,
    /// How many candidates matched (1 or more).
    pub matches: usize,
}

impl<T> DynamicService<T> {
    /// Converts the snapshot form; `target` makes what a candidate sends to (its Service
    /// backend). Defaults for header labels are resolved here, once.
    pub fn from_proto(
        dynamic: &pb::DynamicService,
        defaults: &HeaderDefaults,
        mut target: impl FnMut(&pb::ServiceCandidate) -> Result<T, String>,
    ) -> Result<Self, String> {
        use pb::label_match::Source;
        let labels = dynamic
            .labels
            .iter()
            .map(|label| match &label.source {
                Some(Source::Value(v)) => Ok(LabelSource::Value(v.as_str().into())),
                Some(Source::Header(h)) => {
                    let name = HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(
                        |_| format!("label {:?}: invalid header name {h:?}", label.name),
                    )?;
                    let default = defaults.get(h).unwrap_or_default().into();
                    Ok(LabelSource::Header { name, default })
                }
                None => Err(format!(
                    "label {:?} has neither value nor header",
                    label.name
                )),
            })
            .collect::<Result<Box<[_]>, String>>()?;
        let mut sorted: Vec<&pb::ServiceCandidate> = dynamic.candidates.iter().collect();
        // The contract sorts them already; sorting again keeps the choice deterministic even
        // if it did not.
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let candidates = sorted
            .into_iter()
            .map(|c| {
                let values = dynamic
                    .labels
                    .iter()
                    .map(|label| {
                        c.labels
                            .iter()
                            .find(|l| l.name == label.name)
                            .map(|l| l.value.as_str().into())
                    })
                    .collect();
                Ok(Candidate {
                    values,
                    target: target(c)?,
                })
            })
            .collect::<Result<Box<[_]>, String>>()?;
        Ok(DynamicService { labels, candidates })
    }

    /// The Service for a request with these headers, or `None` (error 10).
    pub fn select(&self, headers: &HeaderMap) -> Option<Selection<'_, T>> {
        let n = self.labels.len();
        let mut inline = [""; INLINE_LABELS];
        let mut spilled = Vec::new();
        let values: &mut [&str] = if n <= INLINE_LABELS {
            &mut inline[..n]
        } else {
            spilled.resize(n, "");
            &mut spilled
        };
        for (slot, label) in values.iter_mut().zip(self.labels.iter()) {
            let value = match label {
                LabelSource::Value(v) => v,
                LabelSource::Header { name, default } => match headers.get(name) {
                    Some(v) if !v.is_empty() => v.to_str().ok()?,
                    _ => default,
                },
            };
            if !kanali_proto::is_label_value(value) {
                return None;
            }
            *slot = value;
        }
        let mut matching = self.candidates.iter().filter(|c| {
            c.values
                .iter()
                .zip(values.iter())
                .all(|(have, want)| have.as_deref() == Some(*want))
        });
        let first = matching.next()?;
        Some(Selection {
            target: &first.target,
            matches: 1 + matching.count(),
        })
    }

    /// The candidates' targets, first choice first.
    pub fn targets(&self) -> impl Iterator<Item = &T> {
        self.candidates.iter().map(|c| &c.target)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use http::HeaderValue;
    use pb::label_match::Source;

    fn label(name: &str, source: Source) -> pb::LabelMatch {
        pb::LabelMatch {
            name: name.into(),
            source: Some(source),
        }
    }

    fn candidate(name: &str, labels: &[(&str, &str)]) -> pb::ServiceCandidate {
        pb::ServiceCandidate {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(n, v)| pb::Header {
                    name: (*n).into(),
                    value: (*v).into(),
                })
                .collect(),
        }
    }

    /// `app=catalog` literal, `track` from `x-release-track`.
    fn catalog(defaults: &HeaderDefaults) -> DynamicService<String> {
        let dynamic = pb::DynamicService {
            namespace: "shop".into(),
            port: 8080,
            scheme: "http".into(),
            tls: String::new(),
            labels: vec![
                label("app", Source::Value("catalog".into())),
                label("track", Source::Header("x-release-track".into())),
            ],
            // Deliberately unsorted: the choice must not depend on the order received.
            candidates: vec![
                candidate("catalog-stable", &[("app", "catalog"), ("track", "stable")]),
                candidate(
                    "catalog-canary-b",
                    &[("app", "catalog"), ("track", "canary")],
                ),
                candidate(
                    "catalog-canary-a",
                    &[("app", "catalog"), ("track", "canary")],
                ),
                candidate("catalog-blank", &[("app", "catalog"), ("track", "")]),
                candidate("catalog-untracked", &[("app", "catalog")]),
                candidate("other", &[("app", "other"), ("track", "stable")]),
            ],
        };
        DynamicService::from_proto(&dynamic, defaults, |c| Ok(c.name.clone())).unwrap()
    }

    fn pick(d: &DynamicService<String>, track: Option<&str>) -> Option<(String, usize)> {
        let mut headers = HeaderMap::new();
        if let Some(t) = track {
            headers.insert("x-release-track", HeaderValue::from_str(t).unwrap());
        }
        d.select(&headers).map(|s| (s.target.clone(), s.matches))
    }

    #[test]
    fn header_value_selects_and_multi_match_takes_the_first_by_name() {
        let d = catalog(&HeaderDefaults::default());
        assert_eq!(pick(&d, Some("stable")), Some(("catalog-stable".into(), 1)));
        assert_eq!(
            pick(&d, Some("canary")),
            Some(("catalog-canary-a".into(), 2))
        );
        assert_eq!(pick(&d, Some("beta")), None);
        // The literal label is checked too: `other` has track=stable but app=other.
        assert_eq!(
            d.targets().map(String::as_str).collect::<Vec<_>>(),
            [
                "catalog-blank",
                "catalog-canary-a",
                "catalog-canary-b",
                "catalog-stable",
                "catalog-untracked",
                "other"
            ]
        );
    }

    #[test]
    fn missing_or_empty_header_uses_the_default_else_the_empty_value() {
        let none = catalog(&HeaderDefaults::default());
        // "" matches a Service whose label is present and empty, not one without the label.
        assert_eq!(pick(&none, None), Some(("catalog-blank".into(), 1)));
        assert_eq!(pick(&none, Some("")), Some(("catalog-blank".into(), 1)));
        let defaults = HeaderDefaults::new([
            ("X-Release-Track".to_owned(), "canary".to_owned()),
            ("x-other".to_owned(), "x".to_owned()),
        ]);
        let with = catalog(&defaults);
        assert_eq!(pick(&with, None), Some(("catalog-canary-a".into(), 2)));
        assert_eq!(pick(&with, Some("")), Some(("catalog-canary-a".into(), 2)));
        assert_eq!(
            pick(&with, Some("stable")),
            Some(("catalog-stable".into(), 1))
        );
    }

    #[test]
    fn an_invalid_label_value_matches_nothing() {
        let d = catalog(&HeaderDefaults::default());
        for bad in ["has space", "-leading", "trailing.", &"a".repeat(64), "ünï"] {
            let mut headers = HeaderMap::new();
            headers.insert(
                "x-release-track",
                HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            );
            assert!(d.select(&headers).is_none(), "{bad:?} matched");
        }
        // A bad default is no better.
        let bad_default = catalog(&HeaderDefaults::new([(
            "x-release-track".to_owned(),
            "no way".to_owned(),
        )]));
        assert_eq!(pick(&bad_default, None), None);
    }

    #[test]
    fn literal_only_labels_and_no_labels() {
        let dynamic = pb::DynamicService {
            labels: vec![label("app", Source::Value("catalog".into()))],
            candidates: vec![
                candidate("b", &[("app", "catalog")]),
                candidate("a", &[("app", "catalog")]),
            ],
            ..Default::default()
        };
        let d = DynamicService::from_proto(&dynamic, &HeaderDefaults::default(), |c| {
            Ok(c.name.clone())
        })
        .unwrap();
        let s = d.select(&HeaderMap::new()).unwrap();
        assert_eq!((s.target.as_str(), s.matches), ("a", 2));
        let empty = pb::DynamicService::default();
        let d: DynamicService<String> =
            DynamicService::from_proto(&empty, &HeaderDefaults::default(), |c| Ok(c.name.clone()))
                .unwrap();
        assert!(d.select(&HeaderMap::new()).is_none());
    }

    #[test]
    fn many_labels_spill_without_changing_the_answer() {
        let labels: Vec<_> = (0..INLINE_LABELS + 3)
            .map(|i| label(&format!("l{i}"), Source::Header(format!("x-l{i}"))))
            .collect();
        let pairs: Vec<(String, String)> = (0..INLINE_LABELS + 3)
            .map(|i| (format!("l{i}"), format!("v{i}")))
            .collect();
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let dynamic = pb::DynamicService {
            labels,
            candidates: vec![candidate("wide", &refs)],
            ..Default::default()
        };
        let d = DynamicService::from_proto(&dynamic, &HeaderDefaults::default(), |c| {
            Ok(c.name.clone())
        })
        .unwrap();
        let mut headers = HeaderMap::new();
        for i in 0..INLINE_LABELS + 3 {
            headers.insert(
                HeaderName::from_bytes(format!("x-l{i}").as_bytes()).unwrap(),
                HeaderValue::from_str(&format!("v{i}")).unwrap(),
            );
        }
        assert_eq!(d.select(&headers).unwrap().target, "wide");
        headers.insert("x-l10", HeaderValue::from_static("nope"));
        assert!(d.select(&headers).is_none());
    }

    #[test]
    fn bad_protos_are_rejected() {
        let no_source = pb::DynamicService {
            labels: vec![pb::LabelMatch {
                name: "a".into(),
                source: None,
            }],
            ..Default::default()
        };
        let r: Result<DynamicService<()>, _> =
            DynamicService::from_proto(&no_source, &HeaderDefaults::default(), |_| Ok(()));
        assert!(r.is_err());
        let bad_header = pb::DynamicService {
            labels: vec![label("a", Source::Header("bad header".into()))],
            ..Default::default()
        };
        let r: Result<DynamicService<()>, _> =
            DynamicService::from_proto(&bad_header, &HeaderDefaults::default(), |_| Ok(()));
        assert!(r.is_err());
    }
}

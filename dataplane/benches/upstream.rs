//! Cost of the per-request upstream choices: picking an address with power of two choices,
//! and choosing a dynamic Service from request headers.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use kanali_dataplane::upstream::balance::{Candidate, pick};
use kanali_dataplane::upstream::dynamic::{DynamicService, HeaderDefaults};
use kanali_proto::v1 as pb;

struct Addr(AtomicUsize);

impl Candidate for Addr {
    fn in_flight(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    fn failed_at(&self) -> u64 {
        0
    }
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [3, 1000] {
        let set: Vec<Addr> = (0..n).map(|i| Addr(AtomicUsize::new(i % 4))).collect();
        group.bench_function(format!("{n}_addresses"), |b| {
            b.iter(|| pick(black_box(&set), 1, |_| false).map(|a| a.in_flight()))
        });
    }
    group.finish();
}

fn bench_dynamic(c: &mut Criterion) {
    use pb::label_match::Source;
    let candidate = |name: String, track: &str| pb::ServiceCandidate {
        name,
        labels: vec![
            pb::Header {
                name: "app".into(),
                value: "catalog".into(),
            },
            pb::Header {
                name: "track".into(),
                value: track.into(),
            },
        ],
    };
    let dynamic = pb::DynamicService {
        labels: vec![
            pb::LabelMatch {
                name: "app".into(),
                source: Some(Source::Value("catalog".into())),
            },
            pb::LabelMatch {
                name: "track".into(),
                source: Some(Source::Header("x-release-track".into())),
            },
        ],
        candidates: (0..20)
            .map(|i| candidate(format!("catalog-{i:02}"), &format!("track-{i}")))
            .collect(),
        ..Default::default()
    };
    let d =
        DynamicService::from_proto(&dynamic, &HeaderDefaults::default(), |c| Ok(c.name.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
    let mut headers = HeaderMap::new();
    headers.insert("x-release-track", HeaderValue::from_static("track-17"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    assert_eq!(
        d.select(&headers).map(|s| s.target.as_str()),
        Some("catalog-17")
    );
    c.bench_function("dynamic_select/20_candidates", |b| {
        b.iter(|| d.select(black_box(&headers)).map(|s| s.matches))
    });
}

criterion_group!(benches, bench_pick, bench_dynamic);
criterion_main!(benches);

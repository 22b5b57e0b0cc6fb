//! Standalone mode's source: a directory of YAML manifests, as `kubectl apply -f DIR` would read
//! it. Every `*.yaml`/`*.yml` file (multi-document, `kind: List` too) is parsed; a file that does
//! not parse is reported with its name, line and reason, and the objects it last held stay in
//! effect, so a half-saved edit never takes routes down. Files are read document by document
//! where that reads the same, so that one changed document in a file of hundreds is the only
//! one parsed again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::compile::api_key::FastHash;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Endpoints, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kanali_crds::{ApiKey, ApiKeyBinding, ApiProxy, MockTarget};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::compile::Objects;

/// A file that could not be used, with where and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileError {
    /// The file, as found in the manifests directory.
    pub file: String,
    /// 1-based line of the problem (or of the document holding it), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// One object read from a file.
#[derive(Clone, Debug)]
pub enum AnyObject {
    /// kanali.io/v2 ApiProxy.
    ApiProxy(Box<ApiProxy>),
    /// kanali.io/v2 MockTarget.
    MockTarget(Box<MockTarget>),
    /// kanali.io/v2 ApiKey.
    ApiKey(Box<ApiKey>),
    /// kanali.io/v2 ApiKeyBinding.
    ApiKeyBinding(Box<ApiKeyBinding>),
    /// v1 Secret.
    Secret(Box<Secret>),
    /// v1 Service.
    Service(Box<Service>),
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice(Box<EndpointSlice>),
    /// v1 Endpoints.
    Endpoints(Box<Endpoints>),
}

impl AnyObject {
    fn key(&self) -> (&'static str, &str, &str) {
        fn k<'a, K: kube::Resource>(
            kind: &'static str,
            o: &'a K,
        ) -> (&'static str, &'a str, &'a str) {
            let m = o.meta();
            (
                kind,
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
            )
        }
        match self {
            AnyObject::ApiProxy(o) => k("ApiProxy", o.as_ref()),
            AnyObject::MockTarget(o) => k("MockTarget", o.as_ref()),
            AnyObject::ApiKey(o) => k("ApiKey", o.as_ref()),
            AnyObject::ApiKeyBinding(o) => k("ApiKeyBinding", o.as_ref()),
            AnyObject::Secret(o) => k("Secret", o.as_ref()),
            AnyObject::Service(o) => k("Service", o.as_ref()),
            AnyObject::EndpointSlice(o) => k("EndpointSlice", o.as_ref()),
            AnyObject::Endpoints(o) => k("Endpoints", o.as_ref()),
        }
    }
}

/// A parsed file: its objects, plus documents that were skipped on purpose (unknown kinds).
#[derive(Clone, Debug, Default)]
pub struct ParsedFile {
    /// Objects of the kinds Kanali reads.
    pub objects: Vec<AnyObject>,
    /// One line per skipped document, e.g. `line 12: apps/v1 Deployment is not read by Kanali`.
    pub ignored: Vec<String>,
}

/// Parses one manifest file. Any problem fails the whole file, like `kubectl apply` would, so
/// that the caller can keep the file's last good objects.
pub fn parse_file(file: &str, text: &str) -> Result<ParsedFile, FileError> {
    let err = |line: Option<u64>, message: String| FileError {
        file: file.to_owned(),
        line,
        message,
    };
    let docs: Vec<serde_saphyr::Spanned<serde_json::Value>> = serde_saphyr::from_multiple(text)
        .map_err(|e| {
            let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
            err(
                line,
                format!("not valid YAML: {}", first_line(&e.to_string())),
            )
        })?;
    let mut parsed = ParsedFile::default();
    for doc in docs {
        let line = Some(doc.referenced.line()).filter(|l| *l > 0);
        decode_document(doc.value, &mut parsed).map_err(|m| err(line, m))?;
    }
    Ok(parsed)
}

/// Splits a manifest file into the texts of its documents, at the lines that start one
/// (`---`, alone or followed by a space). YAML forbids such a line inside any scalar or
/// collection, so the split is where any parser would split. `None` for a file in which a
/// document could depend on what comes before it (directives, `...` markers) or that holds
/// more documents than a file may: such a file is parsed whole.
fn split_documents(text: &str) -> Option<Vec<&str>> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
        };
        if line.starts_with('%') || marker("...") {
            return None;
        }
        if marker("---") && at > start {
            documents.push(&text[start..at]);
            start = at;
        }
        at += line.len();
    }
    if at > start || documents.is_empty() {
        documents.push(&text[start..]);
    }
    // The parser's own limit for a whole file.
    let most = serde_saphyr::Budget::default().max_documents;
    (documents.len() <= most).then_some(documents)
}

/// A file's documents by their text: what each decoded to. foldhash, as every map a change
/// fills: SipHash over the documents' texts was a third of a scan.
type Pieces = HashMap<String, Piece, FastHash>;

/// What one document of a file decoded to, kept by its text across scans.
#[derive(Clone)]
struct Piece {
    parsed: Arc<ParsedFile>,
    /// What reading it used of the parser's budget.
    used: Usage,
}

/// The parser's budget counts that add up over the documents of a file: events, aliases,
/// anchors, recorded anchor events and bytes, documents, nodes, scalar bytes, comment bytes,
/// merge keys.
#[derive(Clone, Copy, Default)]
struct Usage([usize; 10]);

impl Usage {
    fn of(r: &serde_saphyr::budget::BudgetReport) -> Usage {
        Usage([
            r.events,
            r.aliases,
            r.anchors,
            r.recorded_anchor_events,
            r.recorded_anchor_bytes,
            r.documents,
            r.nodes,
            r.total_scalar_bytes,
            r.total_comment_bytes,
            r.merge_keys,
        ])
    }

    /// What the parser allows a whole file.
    fn limits() -> Usage {
        let b = serde_saphyr::Budget::default();
        Usage([
            b.max_events,
            b.max_aliases,
            b.max_anchors,
            b.max_recorded_anchor_events,
            b.max_recorded_anchor_bytes,
            b.max_documents,
            b.max_nodes,
            b.max_total_scalar_bytes,
            b.max_total_comment_bytes,
            b.max_merge_keys,
        ])
    }

    fn add(&mut self, other: Usage) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    fn within(&self, limits: &Usage) -> bool {
        self.0.iter().zip(limits.0).all(|(u, l)| *u <= l)
    }
}

/// Parses `text` document by document, taking documents whose text is unchanged from `known`
/// instead of parsing them again. Each document is read under the parser's budget for a whole
/// file, and what all of them used together must fit that budget as well, so a file read this
/// way passes the same limits as one read whole. `None` when a document cannot be read on its
/// own or the file's documents together go over the budget: the caller parses the whole file,
/// which gives the authoritative answer, with the file's line numbers in any error. The
/// documents read (or taken from `known`) come back either way.
fn parse_documents(text: &str, known: &Pieces) -> (Option<Vec<Arc<ParsedFile>>>, Pieces) {
    let mut pieces = Pieces::default();
    let Some(documents) = split_documents(text) else {
        return (None, pieces);
    };
    let limits = Usage::limits();
    let mut used = Usage::default();
    let mut order = Vec::with_capacity(documents.len());
    for document in documents {
        let piece = match pieces.get(document).or_else(|| known.get(document)) {
            Some(piece) => Piece::clone(piece),
            None => match parse_document(document) {
                Some(piece) => piece,
                None => return (None, pieces),
            },
        };
        used.add(piece.used);
        order.push(piece.parsed.clone());
        pieces.insert(document.to_owned(), piece);
        if !used.within(&limits) {
            return (None, pieces);
        }
    }
    (Some(order), pieces)
}

/// Reads one document's text (which may hold several documents, or none) on its own, with
/// what the parser used of its budget.
fn parse_document(document: &str) -> Option<Piece> {
    let report = std::rc::Rc::new(std::cell::RefCell::new(None));
    let sink = report.clone();
    let mut options = serde_saphyr::Options::default();
    options.budget_report_cb = Some(std::rc::Rc::new(std::cell::RefCell::new(
        move |r: serde_saphyr::budget::BudgetReport| *sink.borrow_mut() = Some(Usage::of(&r)),
    )));
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(document, options).ok()?;
    let mut parsed = ParsedFile::default();
    for doc in docs {
        decode_document(doc, &mut parsed).ok()?;
    }
    // No report, nothing to account with: the file is read whole.
    let used = report.borrow_mut().take()?;
    Some(Piece {
        parsed: Arc::new(parsed),
        used,
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn decode_document(value: serde_json::Value, out: &mut ParsedFile) -> Result<(), String> {
    if value.is_null() {
        return Ok(()); // empty document, e.g. a trailing `---`
    }
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    if api_version.is_empty() || kind.is_empty() {
        return Err("document has no apiVersion or kind".to_owned());
    }
    let obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                _ => return Err("v1 List has no items array".to_owned()),
            };
            for (i, item) in items.into_iter().enumerate() {
                decode_document(item, out).map_err(|e| format!("items[{i}]: {e}"))?;
            }
            return Ok(());
        }
        ("kanali.io/v2", "ApiProxy") => {
            AnyObject::ApiProxy(Box::new(namespaced(decode(value, &kind)?)))
        }
        ("kanali.io/v2", "MockTarget") => {
            AnyObject::MockTarget(Box::new(namespaced(decode(value, &kind)?)))
        }
        ("kanali.io/v2", "ApiKeyBinding") => {
            AnyObject::ApiKeyBinding(Box::new(namespaced(decode(value, &kind)?)))
        }
        ("kanali.io/v2", "ApiKey") => {
            let mut key: ApiKey = decode(value, &kind)?;
            key.metadata.namespace = None; // cluster-scoped
            AnyObject::ApiKey(Box::new(key))
        }
        ("v1", "Secret") => AnyObject::Secret(Box::new(merge_string_data(namespaced(decode(
            value, &kind,
        )?)))),
        ("v1", "Service") => AnyObject::Service(Box::new(namespaced(decode(value, &kind)?))),
        ("v1", "Endpoints") => AnyObject::Endpoints(Box::new(namespaced(decode(value, &kind)?))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            AnyObject::EndpointSlice(Box::new(namespaced(decode(value, &kind)?)))
        }
        (_, "ApiProxy" | "MockTarget" | "ApiKey" | "ApiKeyBinding")
            if api_version.starts_with("kanali.io/") =>
        {
            return Err(format!(
                "{api_version} is not supported; Kanali reads kanali.io/v2 {kind}"
            ));
        }
        _ => {
            out.ignored
                .push(format!("{api_version} {kind} is not read by Kanali"));
            return Ok(());
        }
    };
    let (_, _, name) = obj.key();
    if name.is_empty() {
        return Err(format!("{kind} has no metadata.name"));
    }
    out.objects.push(obj);
    Ok(())
}

/// Decodes with the failing field's path in the message (`spec.target.backend.service.port: ...`).
fn decode<T: DeserializeOwned>(value: serde_json::Value, kind: &str) -> Result<T, String> {
    let name = value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("{kind} {name}: {inner}")
        } else {
            format!("{kind} {name}: {path}: {inner}")
        }
    })
}

fn namespaced<K: kube::Resource>(mut obj: K) -> K {
    let ns = &mut obj.meta_mut().namespace;
    if ns.as_deref().is_none_or(str::is_empty) {
        *ns = Some("default".to_owned());
    }
    obj
}

/// The API server folds `stringData` into `data`; do the same so both sources look alike.
fn merge_string_data(mut secret: Secret) -> Secret {
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (k, v) in strings {
            data.insert(k, ByteString(v.into_bytes()));
        }
    }
    secret
}

/// What a scan of the directory found.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// The objects in effect (last good version of every file).
    pub objects: Objects,
    /// Files (or documents) that could not be used.
    pub errors: Vec<FileError>,
    /// Documents skipped on purpose, `file: reason`.
    pub ignored: Vec<String>,
}

struct FileState {
    /// The content last parsed; `None` when the last read failed (nothing to compare with).
    text: Option<String>,
    /// The last good version's objects, document by document in file order (or in one piece
    /// when it was parsed whole).
    parsed: Option<Vec<Arc<ParsedFile>>>,
    /// The last good version's documents by text, when it could be read one by one.
    pieces: Pieces,
    error: Option<FileError>,
}

/// Reads a manifests directory and remembers, per file, the last version that parsed.
pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl FileSource {
    /// A source over `dir` (not read until [`FileSource::scan`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSource {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// The directory being read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory, parsing only files whose content changed.
    pub fn scan(&mut self) -> Result<Scan, std::io::Error> {
        let mut present = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if !is_yaml || !path.is_file() {
                continue;
            }
            let display = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            present.insert(path.clone());
            let text = match std::fs::read(&path) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(t) => t,
                    Err(_) => {
                        self.record_error(
                            &path,
                            FileError {
                                file: display,
                                line: None,
                                message: "not UTF-8 text".to_owned(),
                            },
                        );
                        continue;
                    }
                },
                // Vanished between listing and reading: the next scan sees the delete.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    self.record_error(
                        &path,
                        FileError {
                            file: display,
                            line: None,
                            message: format!("cannot read: {e}"),
                        },
                    );
                    continue;
                }
            };
            if self
                .files
                .get(&path)
                .is_some_and(|s| s.text.as_deref() == Some(text.as_str()))
            {
                continue;
            }
            let last = self.files.remove(&path);
            let none = Pieces::default();
            let known = last.as_ref().map_or(&none, |s| &s.pieces);
            let (by_document, pieces) = parse_documents(&text, known);
            let parsed = match by_document {
                Some(order) => Ok(order),
                None => parse_file(&display, &text).map(|p| vec![Arc::new(p)]),
            };
            let state = match parsed {
                // Read whole or not, the documents read on their own are kept: a file with one
                // that never reads alone re-reads only its changed documents before the whole.
                Ok(order) => FileState {
                    text: Some(text),
                    parsed: Some(order),
                    pieces,
                    error: None,
                },
                Err(error) => {
                    tracing::warn!(%error, "manifest file not applied; keeping its last good objects");
                    let (parsed, pieces) = last.map(|s| (s.parsed, s.pieces)).unwrap_or_default();
                    FileState {
                        text: Some(text),
                        parsed,
                        pieces,
                        error: Some(error),
                    }
                }
            };
            self.files.insert(path, state);
        }
        self.files.retain(|path, _| present.contains(path));
        Ok(self.collect())
    }

    fn record_error(&mut self, path: &Path, error: FileError) {
        tracing::warn!(%error, "manifest file not applied; keeping its last good objects");
        let state = self.files.entry(path.to_owned()).or_insert(FileState {
            text: None,
            parsed: None,
            pieces: Pieces::default(),
            error: None,
        });
        state.text = None;
        state.error = Some(error);
    }

    fn collect(&self) -> Scan {
        let mut scan = Scan::default();
        // Where each object was first defined. Borrowed, and hashed rather than ordered: this
        // runs over every object on every change (it was a fifth of the controller's work for
        // an edit among 1 000 objects, with a key's two strings copied for each).
        let objects = || {
            let parsed = self.files.values().flat_map(|s| s.parsed.iter().flatten());
            parsed.flat_map(|p| &p.objects)
        };
        let mut seen: HashMap<(&'static str, &str, &str), &str, FastHash> =
            HashMap::with_capacity_and_hasher(objects().count(), FastHash::default());
        // The one kind there are many of; an ApiProxy is ~1 KiB, copied at every doubling.
        let api_proxies = objects().filter(|o| matches!(o, AnyObject::ApiProxy(_)));
        scan.objects.api_proxies.reserve(api_proxies.count());
        let displays: Vec<String> = self
            .files
            .keys()
            .map(|path| {
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        for (state, display) in self.files.values().zip(&displays) {
            scan.errors.extend(state.error.clone());
            let Some(parsed) = &state.parsed else {
                continue;
            };
            let ignored = parsed.iter().flat_map(|p| &p.ignored);
            scan.ignored
                .extend(ignored.map(|i| format!("{display}: {i}")));
            for obj in parsed.iter().flat_map(|p| &p.objects) {
                let key = obj.key();
                if let Some(first) = seen.get(&key) {
                    scan.errors.push(FileError {
                        file: display.clone(),
                        line: None,
                        message: format!(
                            "{} {}/{} is also defined in {first}; the copy in {first} is used",
                            key.0, key.1, key.2
                        ),
                    });
                    continue;
                }
                seen.insert(key, display);
                let o = &mut scan.objects;
                match obj.clone() {
                    AnyObject::ApiProxy(x) => o.api_proxies.push(*x),
                    AnyObject::MockTarget(x) => o.mock_targets.push(*x),
                    AnyObject::ApiKey(x) => o.api_keys.push(*x),
                    AnyObject::ApiKeyBinding(x) => o.api_key_bindings.push(*x),
                    AnyObject::Secret(x) => o.secrets.push(*x),
                    AnyObject::Service(x) => o.services.push(*x),
                    AnyObject::EndpointSlice(x) => o.endpoint_slices.push(*x),
                    AnyObject::Endpoints(x) => o.endpoints.push(*x),
                }
            }
        }
        scan
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;

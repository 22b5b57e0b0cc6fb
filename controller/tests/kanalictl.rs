//! `kanalictl` as a user runs it: the built binary in a process, keys in temporary files, and
//! the openssl CLI as an independent implementation of the ciphertext format.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a failed unwrap is a failed test

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

const OAEP_OPTIONS: [&str; 8] = [
    "-pkeyopt",
    "rsa_padding_mode:oaep",
    "-pkeyopt",
    "rsa_oaep_md:sha256",
    "-pkeyopt",
    "rsa_mgf1_md:sha256",
    "-pkeyopt",
    // hex of "kanali"
    "rsa_oaep_label:6b616e616c69",
];

fn run(program: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            if program == "openssl" && e.kind() == std::io::ErrorKind::NotFound {
                panic!(
                    "openssl is not installed: these tests check compatibility against it \
                     (Debian: apt-get install openssl)"
                );
            }
            panic!("cannot run {program}: {e}")
        });
    // A process that fails before reading stdin closes it: that is its answer, not an error.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Runs kanalictl, which must succeed; returns (stdout, stderr).
fn kanalictl(args: &[&str], stdin: &[u8]) -> (String, String) {
    let out = run(env!("CARGO_BIN_EXE_kanalictl"), args, stdin);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "kanalictl {args:?} failed: {stderr}");
    (text(&out.stdout), stderr)
}

/// Runs kanalictl, which must fail with exit code 1 and `error: …` on stderr; returns stderr.
fn kanalictl_fails(args: &[&str], stdin: &[u8]) -> String {
    let out = run(env!("CARGO_BIN_EXE_kanalictl"), args, stdin);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "kanalictl {args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {:?}",
        text(&out.stdout)
    );
    stderr
}

fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let out = run("openssl", args, stdin);
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        text(&out.stderr)
    );
    out.stdout
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An RSA key made by openssl: PKCS#1 (`RSA PRIVATE KEY`) or PKCS#8 (`PRIVATE KEY`).
/// Returns (private key file, public key file).
fn openssl_key(dir: &Path, name: &str, pkcs1: bool) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.pem"));
    if pkcs1 {
        openssl(&["genrsa", "-traditional", "-out", path(&key), "2048"], b"");
    } else {
        let args = [
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ];
        openssl(&[&args[..], &["-out", path(&key)]].concat(), b"");
    }
    let header = std::fs::read_to_string(&key).unwrap();
    let label = if pkcs1 {
        "RSA PRIVATE KEY"
    } else {
        "PRIVATE KEY"
    };
    assert!(header.starts_with(&format!("-----BEGIN {label}-----")));
    let public = dir.join(format!("{name}.pub"));
    openssl(
        &["pkey", "-in", path(&key), "-pubout", "-out", path(&public)],
        b"",
    );
    (key, public)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap()
}

/// The key printed on stderr by `generate` and `rotate`.
fn shown_plaintext(stderr: &str, name: &str) -> String {
    let notice = format!("API key \"{name}\" (store it now; it is not shown again):\n");
    let rest = stderr
        .strip_prefix(&notice)
        .unwrap_or_else(|| panic!("{stderr}"));
    let key = rest.trim_end_matches('\n');
    assert_eq!(key.len(), 32, "{stderr}");
    assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
    key.to_owned()
}

fn decrypt(private_key: &Path, data: &str) -> String {
    kanalictl(
        &["apikey", "decrypt", "--private-key", path(private_key)],
        data.as_bytes(),
    )
    .0
}

#[test]
fn generate_then_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_key(dir.path(), "k", false);
    let (stdout, stderr) = kanalictl(
        &[
            "apikey",
            "generate",
            "--name",
            "mobile-app",
            "--public-key",
            path(&public),
        ],
        b"",
    );
    let plaintext = shown_plaintext(&stderr, "mobile-app");
    assert!(!stdout.contains("null"), "{stdout}");
    let doc = yaml(&stdout);
    assert_eq!(doc["apiVersion"], "kanali.io/v2");
    assert_eq!(doc["kind"], "ApiKey");
    assert_eq!(doc["metadata"], serde_json::json!({"name": "mobile-app"}));
    assert!(doc.get("status").is_none(), "{stdout}");
    let revisions = doc["spec"]["revisions"].as_array().unwrap();
    assert_eq!(revisions.len(), 1);
    assert_eq!(revisions[0]["status"], "Active");
    let data = revisions[0]["data"].as_str().unwrap();
    assert_eq!(data.len(), 684);
    assert_eq!(decrypt(&key, data), format!("{plaintext}\n"));
}

#[test]
fn generate_writes_the_key_to_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_key(dir.path(), "k", true);
    let out = dir.path().join("app.key");
    let args = [
        "apikey",
        "generate",
        "--name",
        "app.example",
        "--public-key",
        path(&public),
        "--length",
        "40",
        "--plaintext-out",
        path(&out),
    ];
    let (stdout, stderr) = kanalictl(&args, b"");
    assert!(stderr.contains(path(&out)), "{stderr}");
    let plaintext = std::fs::read_to_string(&out).unwrap();
    assert_eq!(plaintext.trim_end().len(), 40);
    assert!(
        !stderr.contains(plaintext.trim_end()),
        "the key is not shown: {stderr}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let data = yaml(&stdout)["spec"]["revisions"][0]["data"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(decrypt(&key, &data), plaintext);

    let err = kanalictl_fails(&args, b"");
    assert!(err.contains("already exists; not overwriting it"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), plaintext);

    let err = kanalictl_fails(
        &[
            "apikey",
            "generate",
            "--name",
            "Mobile_App",
            "--public-key",
            path(&public),
        ],
        b"",
    );
    assert!(
        err.contains("\"Mobile_App\" is not a Kubernetes object name"),
        "{err}"
    );
}

#[test]
fn encrypt_decrypt_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_key(dir.path(), "k", true);
    let encrypt = ["apikey", "encrypt", "--public-key", path(&public)];
    for (input, plaintext) in [
        (&b"s3cr3t\n"[..], "s3cr3t"),
        (b"s3cr3t\r\n", "s3cr3t"),
        (b"no newline", "no newline"),
        (b"two\n\n", "two\n"),
    ] {
        let (data, _) = kanalictl(&encrypt, input);
        assert!(data.ends_with('\n'));
        assert_eq!(decrypt(&key, &data), format!("{plaintext}\n"));
    }
    for empty in [&b""[..], b"\n", b"\r\n"] {
        let err = kanalictl_fails(&encrypt, empty);
        assert!(err.contains("no API key on stdin"), "{err}");
    }
    let err = kanalictl_fails(&encrypt, &[b'a'; 191]);
    assert!(err.contains("encrypts at most 190"), "{err}");
}

const KUBECTL_OUTPUT: &str = r#"apiVersion: kanali.io/v2
kind: ApiKey
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"kanali.io/v2","kind":"ApiKey","metadata":{"name":"mobile-app"}}
    team: payments
  creationTimestamp: "2026-11-01T12:00:00Z"
  generation: 3
  labels:
    tier: gold
  managedFields:
  - apiVersion: kanali.io/v2
    fieldsType: FieldsV1
    manager: kubectl-client-side-apply
    operation: Update
  name: mobile-app
  resourceVersion: "48121"
  uid: 0b7a2a52-6f8e-4c8e-9a57-0d8c5b6a4d11
spec:
  revisions:
  - data: @DATA@
    lastUsed: "2026-11-20T08:00:00Z"
    status: Active
status:
  conditions:
  - lastTransitionTime: "2026-11-01T12:00:01Z"
    message: ""
    reason: Decrypted
    status: "True"
    type: Ready
"#;

#[test]
fn rotate() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_key(dir.path(), "k", false);
    let (old_data, _) = kanalictl(
        &["apikey", "encrypt", "--public-key", path(&public)],
        b"old-key",
    );
    let input = KUBECTL_OUTPUT.replace("@DATA@", old_data.trim());
    let file = dir.path().join("mobile-app.yaml");
    std::fs::write(&file, &input).unwrap();

    let (stdout, stderr) = kanalictl(
        &["apikey", "rotate", "-f", "-", "--public-key", path(&public)],
        input.as_bytes(),
    );
    let plaintext = shown_plaintext(&stderr, "mobile-app");
    assert!(!stdout.contains("null"), "{stdout}");
    let doc = yaml(&stdout);
    assert_eq!(doc["kind"], "ApiKey");
    assert_eq!(
        doc["metadata"],
        serde_json::json!({
            "name": "mobile-app",
            "labels": {"tier": "gold"},
            "annotations": {"team": "payments"},
        }),
        "server-owned metadata is dropped: {stdout}"
    );
    assert!(doc.get("status").is_none(), "{stdout}");
    let revisions = doc["spec"]["revisions"].as_array().unwrap();
    assert_eq!(revisions.len(), 2);
    assert_eq!(revisions[0]["status"], "Inactive");
    assert_eq!(revisions[0]["data"], old_data.trim());
    assert_eq!(revisions[0]["lastUsed"], "2026-11-20T08:00:00Z");
    assert_eq!(revisions[1]["status"], "Active");
    let new_data = revisions[1]["data"].as_str().unwrap();
    assert_eq!(decrypt(&key, new_data), format!("{plaintext}\n"));

    let (stdout, _) = kanalictl(
        &[
            "apikey",
            "rotate",
            "-f",
            path(&file),
            "--public-key",
            path(&public),
            "--keep",
        ],
        b"",
    );
    let doc = yaml(&stdout);
    let statuses: Vec<&Value> = doc["spec"]["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["status"])
        .collect();
    assert_eq!(statuses, ["Active", "Active"]);

    // The output rotates again: revisions accumulate at the end.
    let (again, _) = kanalictl(
        &["apikey", "rotate", "-f", "-", "--public-key", path(&public)],
        stdout.as_bytes(),
    );
    let statuses: Vec<Value> = yaml(&again)["spec"]["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(statuses, ["Inactive", "Inactive", "Active"]);
}

#[test]
fn rotate_refuses_other_documents() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = openssl_key(dir.path(), "k", true);
    let rotate = ["apikey", "rotate", "-f", "-", "--public-key", path(&public)];
    let proxy = "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata:\n  name: p\nspec: {}\n";
    let err = kanalictl_fails(&rotate, proxy.as_bytes());
    assert!(
        err.contains("the input has kind ApiProxy, expected one ApiKey"),
        "{err}"
    );
    let list = "apiVersion: v1\nkind: List\nitems: []\n";
    let err = kanalictl_fails(&rotate, list.as_bytes());
    assert!(err.contains("kind List"), "{err}");
    let err = kanalictl_fails(
        &rotate,
        b"apiVersion: kanali.io/v2\nkind: ApiKey\nspec: 3\n",
    );
    assert!(err.contains("not a valid ApiKey"), "{err}");
    let err = kanalictl_fails(&rotate, b"- [unclosed");
    assert!(err.contains("not a YAML document"), "{err}");
}

#[test]
fn keypair_generate() {
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("kanali.pub");
    let private = dir.path().join("kanali.key");
    let args = [
        "keypair",
        "generate",
        "--bits",
        "2048",
        "--public-key-out",
        path(&public),
        "--namespace",
        "gateway",
        "--secret-name",
        "decryption",
        "--private-key-out",
        path(&private),
    ];
    let (stdout, stderr) = kanalictl(&args, b"");
    assert!(stderr.contains("2048-bit key pair"), "{stderr}");
    let secret = yaml(&stdout);
    assert_eq!(secret["apiVersion"], "v1");
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(
        secret["metadata"],
        serde_json::json!({
            "name": "decryption",
            "namespace": "gateway",
            "labels": {"app.kubernetes.io/part-of": "kanali"},
        })
    );
    let pem = STANDARD
        .decode(secret["data"]["key.pem"].as_str().unwrap())
        .unwrap();
    assert!(pem.starts_with(b"-----BEGIN PRIVATE KEY-----\n"));
    assert_eq!(std::fs::read(&private).unwrap(), pem);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // openssl reads both halves, and agrees they belong together.
    let from_private = openssl(&["pkey", "-in", path(&private), "-pubout"], b"");
    assert_eq!(from_private, std::fs::read(&public).unwrap());

    let secret_key = dir.path().join("from-secret.pem");
    std::fs::write(&secret_key, &pem).unwrap();
    let (stdout, stderr) = kanalictl(
        &[
            "apikey",
            "generate",
            "--name",
            "app",
            "--public-key",
            path(&public),
        ],
        b"",
    );
    let plaintext = shown_plaintext(&stderr, "app");
    let data = yaml(&stdout)["spec"]["revisions"][0]["data"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(decrypt(&secret_key, &data), format!("{plaintext}\n"));

    let err = kanalictl_fails(&args, b"");
    assert!(err.contains("already exists; not overwriting it"), "{err}");
    let err = kanalictl_fails(
        &[
            "keypair",
            "generate",
            "--public-key-out",
            "x",
            "--namespace",
            "Bad_NS",
        ],
        b"",
    );
    assert!(err.contains("not a namespace name"), "{err}");
}

/// openssl encrypts, kanalictl decrypts; kanalictl encrypts, openssl decrypts.
fn openssl_interop(pkcs1: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_key(dir.path(), "k", pkcs1);
    let plaintext = "Kanali-v2-compatible-0123456789";

    let ciphertext = openssl(
        &[
            &["pkeyutl", "-encrypt", "-pubin", "-inkey", path(&public)],
            &OAEP_OPTIONS[..],
        ]
        .concat(),
        plaintext.as_bytes(),
    );
    assert_eq!(ciphertext.len(), 256);
    let data = STANDARD.encode(to_hex(&ciphertext));
    assert_eq!(decrypt(&key, &data), format!("{plaintext}\n"));

    // A private key file serves as the public key too.
    for public_key in [&public, &key] {
        let (data, _) = kanalictl(
            &["apikey", "encrypt", "--public-key", path(public_key)],
            plaintext.as_bytes(),
        );
        let hex = text(&STANDARD.decode(data.trim()).unwrap());
        assert_eq!(hex, hex.to_lowercase());
        let decrypted = openssl(
            &[
                &["pkeyutl", "-decrypt", "-inkey", path(&key)],
                &OAEP_OPTIONS[..],
            ]
            .concat(),
            &from_hex(&hex),
        );
        assert_eq!(text(&decrypted), plaintext);
    }
}

#[test]
fn openssl_interop_pkcs1_key() {
    openssl_interop(true);
}

#[test]
fn openssl_interop_pkcs8_key() {
    openssl_interop(false);
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_key(dir.path(), "k", false);
    let (other_key, _) = openssl_key(dir.path(), "other", true);
    let (data, _) = kanalictl(
        &["apikey", "encrypt", "--public-key", path(&public)],
        b"s3cr3t",
    );
    let decrypt_with = |key: &Path, data: &str| {
        kanalictl_fails(
            &["apikey", "decrypt", "--private-key", path(key)],
            data.as_bytes(),
        )
    };

    let err = decrypt_with(&other_key, &data);
    assert!(
        err.contains(
            "cannot decrypt: encrypted for a different public key, or the data is corrupt"
        ),
        "{err}"
    );
    let err = decrypt_with(&key, &data[..data.len() / 2]);
    assert!(
        err.contains("bytes of ciphertext, expected 256 for this key"),
        "{err}"
    );
    let hex = text(&STANDARD.decode(data.trim()).unwrap());
    let err = decrypt_with(&key, &STANDARD.encode(&hex[2..]));
    assert!(
        err.contains("255 bytes of ciphertext, expected 256"),
        "{err}"
    );
    let err = decrypt_with(&key, "this is not base64!");
    assert!(err.contains("the data is not base64"), "{err}");
    let err = decrypt_with(&key, &STANDARD.encode("plain text, not hex"));
    assert!(err.contains("not hex text"), "{err}");

    let not_a_key = dir.path().join("notes.txt");
    std::fs::write(&not_a_key, "just some notes\n").unwrap();
    let err = kanalictl_fails(
        &[
            "apikey",
            "generate",
            "--name",
            "a",
            "--public-key",
            path(&not_a_key),
        ],
        b"",
    );
    assert!(
        err.contains(&format!("public key {}: not a PEM file", path(&not_a_key))),
        "{err}"
    );
    let err = decrypt_with(&not_a_key, &data);
    assert!(err.contains("not a PEM file"), "{err}");
    let missing = dir.path().join("missing.pem");
    let err = decrypt_with(&missing, &data);
    assert!(
        err.contains(&format!("cannot read {}", path(&missing))),
        "{err}"
    );

    let ec = dir.path().join("ec.pem");
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            path(&ec),
        ],
        b"",
    );
    let err = decrypt_with(&ec, &data);
    assert!(err.contains("not an RSA key (EC)"), "{err}");

    let encrypted = dir.path().join("encrypted.pem");
    openssl(
        &[
            "pkey",
            "-in",
            path(&key),
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            path(&encrypted),
        ],
        b"",
    );
    let err = decrypt_with(&encrypted, &data);
    assert!(err.contains("encrypted with a passphrase"), "{err}");

    let small = dir.path().join("small.pem");
    openssl(&["genrsa", "-out", path(&small), "1024"], b"");
    let err = decrypt_with(&small, &data);
    assert!(
        err.contains("1024 bits; at least 2048 are required"),
        "{err}"
    );
}

#[test]
fn help_teaches_the_workflow() {
    for args in [&["--help"][..], &["apikey", "--help"]] {
        let (help, _) = kanalictl(args, b"");
        for step in [
            "kanalictl keypair generate --public-key-out kanali.pub > decryption-key.yaml",
            "kubectl apply -f decryption-key.yaml",
            "kanalictl apikey generate --name mobile-app --public-key kanali.pub | kubectl apply -f -",
            "ApiKeyBinding",
            "kubectl get apikey mobile-app -o yaml",
            "kanalictl apikey rotate -f - --public-key kanali.pub | kubectl apply -f -",
        ] {
            assert!(help.contains(step), "{args:?} lacks {step:?}:\n{help}");
        }
    }
    let (version, _) = kanalictl(&["version"], b"");
    assert_eq!(
        version,
        format!("kanalictl {}\n", env!("CARGO_PKG_VERSION"))
    );
}

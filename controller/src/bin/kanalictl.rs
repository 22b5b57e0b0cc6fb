//! `kanalictl`: makes Kanali API keys and the RSA key pair that protects them.
//!
//! Everything it prints on stdout is ready for `kubectl apply -f -`; secrets meant for a person
//! (a new API key) go to stderr or to a file only that user can read.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, IsTerminal as _, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kanali_controller::crypto::{self, PrivateKey, PublicKey};
use kanali_crds::{ApiKey, ApiKeySpec, Revision, RevisionStatus};
use zeroize::Zeroizing;

const WORKFLOW: &str = "\
Workflow:
  1. Make the key pair, once. The Secret holds the private key, for the controller:
       kanalictl keypair generate --public-key-out kanali.pub > decryption-key.yaml
       kubectl apply -f decryption-key.yaml
     Share kanali.pub with whoever makes API keys. decryption-key.yaml holds the private
     key: delete it once applied, or keep it in a secret store.
  2. Make an API key. The key itself is shown once, on stderr; the cluster stores it
     encrypted:
       kanalictl apikey generate --name mobile-app --public-key kanali.pub | kubectl apply -f -
  3. Grant it: name `mobile-app` under `keys` in an ApiKeyBinding, and add the `apikey`
     plugin (config `apiKeyBindingName: <that binding>`) to the ApiProxy. Clients send the
     key in the `apikey` request header.
  4. Rotate: append a new revision; the older ones turn Inactive (--keep leaves them Active,
     for clients that cannot switch at once):
       kubectl get apikey mobile-app -o yaml \\
         | kanalictl apikey rotate -f - --public-key kanali.pub | kubectl apply -f -
     Then watch the OLDER USED column of `kubectl get apikey mobile-app` (when a request
     last presented a revision other than the newest) go stale; status.revisions[].lastUsed
     (kubectl get apikey mobile-app -o yaml) has it per revision. Then remove the old
     revisions (kubectl edit apikey mobile-app).";

/// Makes Kanali API keys and the RSA key pair that protects them.
#[derive(Debug, Parser)]
#[command(
    name = "kanalictl",
    version,
    long_about = "Makes Kanali API keys and the RSA key pair that protects them.\n\n\
        An ApiKey resource stores its key only encrypted with the controller's RSA public\n\
        key; the controller alone holds the private key (in a Secret) and decrypts.\n\
        kanalictl makes that key pair, generates and encrypts API keys, and rotates them.",
    after_help = WORKFLOW
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate, encrypt, decrypt and rotate API keys.
    #[command(subcommand, after_help = WORKFLOW)]
    Apikey(ApiKeyCommand),
    /// Generate the RSA key pair that protects API keys.
    #[command(subcommand)]
    Keypair(KeypairCommand),
    /// Print the version of kanalictl.
    Version,
}

#[derive(Debug, Subcommand)]
enum ApiKeyCommand {
    /// Generate an API key; print its ApiKey resource (YAML) on stdout.
    ///
    /// The key itself is printed once, on stderr, unless --plaintext-out is given.
    Generate {
        /// Name of the ApiKey (a Kubernetes object name; ApiKeyBindings refer to it).
        #[arg(long)]
        name: String,
        /// PEM file with the controller's RSA public key.
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
        /// Length of the key in characters from [0-9A-Za-z] (32 carry 190 bits).
        #[arg(long, default_value_t = 32)]
        length: usize,
        /// Write the key to this new file (mode 0600) instead of stderr.
        #[arg(long, value_name = "FILE")]
        plaintext_out: Option<PathBuf>,
    },
    /// Encrypt the API key read from stdin; print the revision data.
    Encrypt {
        /// PEM file with the controller's RSA public key.
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
    },
    /// Decrypt revision data read from stdin; print the API key.
    Decrypt {
        /// PEM file with the controller's RSA private key.
        #[arg(long, value_name = "FILE")]
        private_key: PathBuf,
    },
    /// Add a new Active revision to an ApiKey; print the updated resource (YAML).
    ///
    /// Reads the ApiKey as `kubectl get apikey NAME -o yaml` prints it and drops what the API
    /// server owns (status, resourceVersion, managedFields, ...). The new key is printed once,
    /// on stderr, unless --plaintext-out is given.
    Rotate {
        /// The ApiKey YAML; `-` reads stdin.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        /// PEM file with the controller's RSA public key.
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
        /// Leave the older revisions as they are instead of making them Inactive.
        #[arg(long)]
        keep: bool,
        /// Length of the new key in characters from [0-9A-Za-z].
        #[arg(long, default_value_t = 32)]
        length: usize,
        /// Write the new key to this new file (mode 0600) instead of stderr.
        #[arg(long, value_name = "FILE")]
        plaintext_out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum KeypairCommand {
    /// Generate an RSA key pair: the public key to a file, a Secret (YAML) on stdout.
    ///
    /// The Secret holds the private key, as data key `key.pem`, for the controller
    /// (`kanali-controller --decryption-key-secret NAMESPACE/NAME`).
    Generate {
        /// Write the public key (PEM) to this new file.
        #[arg(long, value_name = "FILE")]
        public_key_out: PathBuf,
        /// Key size in bits: 2048, 3072 or 4096. The controller decrypts every revision when
        /// it starts (about 3 ms each at 2048 bits, 8 ms at 3072, on one core), so larger keys
        /// slow the start of a controller with many thousands of ApiKeys.
        #[arg(long, default_value_t = 2048, value_parser = parse_bits)]
        bits: usize,
        /// Name of the Secret.
        #[arg(long, default_value = "kanali-decryption-key")]
        secret_name: String,
        /// Namespace of the Secret.
        #[arg(long, default_value = "kanali-system")]
        namespace: String,
        /// Also write the private key (PEM) to this new file (mode 0600).
        #[arg(long, value_name = "FILE")]
        private_key_out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Apikey(command) => run_apikey(command),
        Command::Keypair(KeypairCommand::Generate {
            public_key_out,
            bits,
            secret_name,
            namespace,
            private_key_out,
        }) => keypair_generate(
            &public_key_out,
            bits,
            &secret_name,
            &namespace,
            private_key_out.as_deref(),
        ),
        Command::Version => stdout(&format!("kanalictl {}\n", env!("CARGO_PKG_VERSION"))),
    }
}

fn run_apikey(command: ApiKeyCommand) -> anyhow::Result<()> {
    match command {
        ApiKeyCommand::Generate {
            name,
            public_key,
            length,
            plaintext_out,
        } => {
            check_object_name(&name).context("--name")?;
            let public = read_public_key(&public_key)?;
            let (revision, plaintext) = new_revision(&public, length)?;
            let key = ApiKey::new(
                &name,
                ApiKeySpec {
                    revisions: vec![revision],
                },
            );
            let yaml = to_yaml(&key)?;
            hand_over(&name, &plaintext, plaintext_out.as_deref())?;
            stdout(&yaml)
        }
        ApiKeyCommand::Encrypt { public_key } => {
            let public = read_public_key(&public_key)?;
            let plaintext = read_stdin(public.max_plaintext_len() + 2)?;
            let plaintext = strip_newline(&plaintext);
            if plaintext.is_empty() {
                bail!("no API key on stdin");
            }
            stdout(&format!("{}\n", public.encrypt(plaintext)?))
        }
        ApiKeyCommand::Decrypt { private_key } => {
            let path = &private_key;
            let pem = Zeroizing::new(
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            );
            let private = PrivateKey::from_pem(&pem)
                .with_context(|| format!("private key {}", path.display()))?;
            let data = read_stdin(64 * 1024)?;
            let data = std::str::from_utf8(&data)
                .map_err(|_| anyhow!("the data on stdin is not text (expected base64)"))?;
            let plaintext = private.decrypt(data)?;
            // Two writes: appending the newline could move the key and leave a copy behind.
            write_stdout(&[&plaintext, b"\n"])
        }
        ApiKeyCommand::Rotate {
            file,
            public_key,
            keep,
            length,
            plaintext_out,
        } => {
            let public = read_public_key(&public_key)?;
            let yaml = read_document(&file)?;
            let mut key = parse_api_key(&yaml)?;
            let name = key.metadata.name.clone().unwrap_or_default();
            let (revision, plaintext) = new_revision(&public, length)?;
            rotate(&mut key, revision, keep);
            let yaml = to_yaml(&key)?;
            hand_over(&name, &plaintext, plaintext_out.as_deref())?;
            stdout(&yaml)
        }
    }
}

fn parse_bits(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(bits) if crypto::KEY_SIZES.contains(&bits) => Ok(bits),
        _ => Err("choose 2048, 3072 or 4096".to_owned()),
    }
}

fn keypair_generate(
    public_key_out: &Path,
    bits: usize,
    secret_name: &str,
    namespace: &str,
    private_key_out: Option<&Path>,
) -> anyhow::Result<()> {
    check_object_name(secret_name).context("--secret-name")?;
    check_label(namespace).context("--namespace")?;
    // Checked up front so that a refusal costs no key generation; create_new below still
    // refuses a file that appears in between.
    for path in std::iter::once(public_key_out).chain(private_key_out) {
        if path.exists() {
            bail!("{} already exists; not overwriting it", path.display());
        }
    }
    let key = crypto::generate_keypair(bits)?;
    let private_pem = key.to_pkcs8_pem()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "kanali".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            "key.pem".to_owned(),
            ByteString(private_pem.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    let yaml = Zeroizing::new(to_yaml(&secret)?);
    create_new(
        public_key_out,
        0o644,
        key.public_key().to_spki_pem().as_bytes(),
    )?;
    if let Some(path) = private_key_out {
        create_new(path, 0o600, private_pem.as_bytes())?;
    }
    let fingerprint = key.fingerprint();
    eprintln!(
        "{bits}-bit key pair {fingerprint}: public key written to {}",
        public_key_out.display()
    );
    if io::stdout().is_terminal() {
        eprintln!(
            "note: the Secret below holds the private key; redirect it to a file \
             (> decryption-key.yaml) or pipe it to kubectl apply -f -"
        );
    }
    stdout(&yaml)
}

/// Generates a key and encrypts it as a new Active revision.
fn new_revision(
    public: &PublicKey,
    length: usize,
) -> anyhow::Result<(Revision, Zeroizing<String>)> {
    let plaintext = crypto::generate_plaintext(length).context("--length")?;
    let revision = Revision {
        data: public.encrypt(plaintext.as_bytes())?,
        status: RevisionStatus::Active,
        last_used: None,
    };
    Ok((revision, plaintext))
}

/// Appends `revision`; unless `keep`, every older revision turns Inactive.
fn rotate(key: &mut ApiKey, revision: Revision, keep: bool) {
    if !keep {
        for old in &mut key.spec.revisions {
            old.status = RevisionStatus::Inactive;
        }
    }
    key.spec.revisions.push(revision);
}

/// Reads an ApiKey as `kubectl get -o yaml` prints it and drops what the API server owns,
/// so that the result applies as the user's own change.
fn parse_api_key(yaml: &str) -> anyhow::Result<ApiKey> {
    let value: serde_json::Value =
        serde_saphyr::from_str(yaml).context("the input is not a YAML document")?;
    let kind = value.get("kind").and_then(|k| k.as_str());
    if kind != Some("ApiKey") {
        let found = kind.map_or_else(|| "no kind".to_owned(), |k| format!("kind {k}"));
        bail!("the input has {found}, expected one ApiKey (kubectl get apikey NAME -o yaml)");
    }
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let expected = format!("{}/{}", kanali_crds::GROUP, kanali_crds::VERSION);
    if api_version != Some(expected.as_str()) {
        bail!(
            "the ApiKey has apiVersion {}, expected {expected}",
            api_version.unwrap_or("(none)")
        );
    }
    let mut key: ApiKey = serde_path_to_error::deserialize(value)
        .map_err(|e| anyhow!("not a valid ApiKey: {}: {}", e.path(), e.inner()))?;
    match key.metadata.name.as_deref() {
        Some(name) => check_object_name(name).context("metadata.name")?,
        None => bail!("the ApiKey has no metadata.name"),
    }
    let meta = &mut key.metadata;
    meta.resource_version = None;
    meta.uid = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.managed_fields = None;
    meta.self_link = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
    key.status = None;
    Ok(key)
}

/// Shows a new API key to the user exactly once: in a new file only they can read, or on
/// stderr, which stays on the terminal while stdout goes to kubectl.
fn hand_over(name: &str, plaintext: &str, out: Option<&Path>) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            let mut contents = Zeroizing::new(String::with_capacity(plaintext.len() + 1));
            contents.push_str(plaintext);
            contents.push('\n');
            create_new(path, 0o600, contents.as_bytes())?;
            eprintln!("API key {name:?} written to {} (mode 0600)", path.display());
        }
        None => eprintln!("API key {name:?} (store it now; it is not shown again):\n{plaintext}"),
    }
    Ok(())
}

fn read_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    PublicKey::from_pem(&pem).with_context(|| format!("public key {}", path.display()))
}

/// Reads a document from a file, or stdin for `-`.
fn read_document(path: &Path) -> anyhow::Result<String> {
    const LIMIT: usize = 4 * 1024 * 1024;
    let bytes = if path == Path::new("-") {
        read_stdin(LIMIT)?.to_vec()
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    String::from_utf8(bytes).map_err(|_| anyhow!("{} is not UTF-8 text", path.display()))
}

/// Reads all of stdin, refusing more than `limit` bytes. The buffer never grows, so no copy
/// of a key is left behind in freed memory.
fn read_stdin(limit: usize) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(limit + 64));
    io::stdin()
        .lock()
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .context("cannot read stdin")?;
    if buf.len() > limit {
        bail!("stdin holds more than {limit} bytes, more than this command reads");
    }
    Ok(buf)
}

/// Drops one trailing line ending (`\n` or `\r\n`), as `echo` and editors add one.
fn strip_newline(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// Creates a file that must not exist yet, readable per `mode` (before the umask).
fn create_new(path: &Path, mode: u32, contents: &[u8]) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => {
            anyhow!("{} already exists; not overwriting it", path.display())
        }
        _ => anyhow!("cannot create {}: {e}", path.display()),
    })?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// One line per scalar: folding the long base64 of revision data into a `>-` block would be
/// valid YAML, but hard to read and to copy.
fn to_yaml(value: &impl serde::Serialize) -> anyhow::Result<String> {
    let options = serde_saphyr::ser_options! { prefer_block_scalars: false };
    Ok(serde_saphyr::to_string_with_options(value, options)?)
}

fn stdout(text: &str) -> anyhow::Result<()> {
    write_stdout(&[text.as_bytes()])
}

fn write_stdout(parts: &[&[u8]]) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    parts
        .iter()
        .try_for_each(|part| out.write_all(part))
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// A Kubernetes object name: a lowercase RFC 1123 subdomain of at most 253 characters.
fn check_object_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 253 || !name.split('.').all(is_label) {
        bail!(
            "{name:?} is not a Kubernetes object name: use at most 253 lowercase letters, \
             digits, '-' and '.', starting and ending with a letter or digit"
        );
    }
    Ok(())
}

/// A namespace name: a lowercase RFC 1123 label of at most 63 characters.
fn check_label(name: &str) -> anyhow::Result<()> {
    if !is_label(name) {
        bail!(
            "{name:?} is not a namespace name: use at most 63 lowercase letters, digits and \
             '-', starting and ending with a letter or digit"
        );
    }
    Ok(())
}

fn is_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
}

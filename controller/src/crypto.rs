//! API-key cryptography: the controller's RSA key pair and the encrypted form of API keys.
//!
//! An ApiKey revision's `data` is, as in Kanali v2, the RSA-OAEP ciphertext of the plaintext
//! key (SHA-256 for both the OAEP hash and MGF1, label `kanali`), written as lowercase hex, and
//! that hex text encoded as standard base64 with padding. `kanalictl` encrypts with the public
//! key; only the controller holds the private key and decrypts.

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use getrandom::SysRng;
use rsa::Oaep;
use rsa::pkcs1::{DecodeRsaPrivateKey as _, DecodeRsaPublicKey as _};
use rsa::pkcs8::{
    DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _,
    LineEnding, ObjectIdentifier, PrivateKeyInfoRef, SubjectPublicKeyInfoRef,
};
use rsa::traits::PublicKeyParts as _;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// The OAEP label of every Kanali ciphertext (v2 compatibility).
const LABEL: &[u8] = b"kanali";

/// Smallest RSA key accepted, in bits.
pub const MIN_KEY_BITS: usize = 2048;

/// The key sizes [`generate_keypair`] makes, in bits.
pub const KEY_SIZES: [usize; 3] = [2048, 3072, 4096];

/// Bytes of every OAEP block that SHA-256 padding takes (2 × 32 + 2).
const OAEP_OVERHEAD: usize = 66;

/// Longest key [`generate_plaintext`] makes: the most the smallest accepted key can encrypt.
pub const MAX_GENERATED_LEN: usize = MIN_KEY_BITS / 8 - OAEP_OVERHEAD;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `rsaEncryption`, the only algorithm of a key Kanali encrypts with. RSASSA-PSS keys are
/// restricted to signatures and are refused.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Reading is lenient about padding: a missing `=` says nothing about whether the data is
/// intact, the hex length check does.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a key could not be loaded or made, or data not encrypted or decrypted.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key file holds no PEM block.
    #[error("not a PEM file: expected a line like -----BEGIN {expected}-----")]
    NotPem {
        /// What the file should hold.
        expected: &'static str,
    },
    /// A PEM block is damaged (bad base64, no END line, bad DER).
    #[error("the PEM block {label:?} is damaged: {reason}")]
    BadPem {
        /// The block's label, e.g. `PRIVATE KEY`.
        label: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The PEM file holds something other than the key asked for.
    #[error("found {found}, expected {expected}")]
    WrongPemKind {
        /// The labels of the blocks found.
        found: String,
        /// What the file should hold.
        expected: &'static str,
    },
    /// The private key is protected by a passphrase.
    #[error(
        "the private key is encrypted with a passphrase; Kanali needs it unencrypted \
         (`openssl pkey -in KEY -out plain.pem` asks for the passphrase and writes it unencrypted)"
    )]
    EncryptedKey,
    /// The key is not an RSA encryption key.
    #[error("not an RSA key ({algorithm}): Kanali encrypts API keys with RSA")]
    NotRsa {
        /// The key's algorithm.
        algorithm: String,
    },
    /// The key is RSA but not valid.
    #[error("not a valid RSA key: {0}")]
    InvalidKey(String),
    /// The key is too small to be safe.
    #[error("the RSA key has {bits} bits; at least {MIN_KEY_BITS} are required")]
    KeyTooSmall {
        /// The key's size.
        bits: usize,
    },
    /// [`generate_keypair`] was asked for a size it does not make.
    #[error("cannot generate a {bits}-bit key: choose 2048, 3072 or 4096")]
    UnsupportedKeySize {
        /// The size asked for.
        bits: usize,
    },
    /// Key generation failed.
    #[error("cannot generate an RSA key: {0}")]
    KeyGeneration(String),
    /// A key could not be encoded.
    #[error("cannot encode the key: {0}")]
    Encoding(String),
    /// The plaintext is empty.
    #[error("the API key to encrypt is empty")]
    EmptyPlaintext,
    /// The plaintext does not fit in one OAEP block of this key.
    #[error("the API key is {len} bytes long; a {bits}-bit key encrypts at most {max}")]
    PlaintextTooLong {
        /// Its length.
        len: usize,
        /// The most this key encrypts.
        max: usize,
        /// The key's size.
        bits: usize,
    },
    /// Encryption failed.
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    /// The data is not base64.
    #[error("the data is not base64: {0}")]
    NotBase64(String),
    /// The data is base64, but what it encodes is not hex text.
    #[error(
        "the data is base64, but what it encodes is not hex text: Kanali data is the \
         ciphertext written as hex, then base64"
    )]
    NotHex,
    /// The ciphertext has the wrong length for the key.
    #[error(
        "{got} bytes of ciphertext, expected {expected} for this key (a 2048-bit key makes \
         256): the data is truncated or padded, or was made for a key of another size"
    )]
    CiphertextLength {
        /// Bytes found.
        got: usize,
        /// Bytes this key's ciphertexts have.
        expected: usize,
    },
    /// The ciphertext has the right length but does not decrypt.
    #[error("cannot decrypt: encrypted for a different public key, or the data is corrupt")]
    Decrypt,
    /// [`generate_plaintext`] was asked for a length it does not make.
    #[error("an API key must be 1 to {MAX_GENERATED_LEN} characters long, not {len}")]
    PlaintextLength {
        /// The length asked for.
        len: usize,
    },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// An RSA public key: encrypts API keys.
#[derive(Clone)]
pub struct PublicKey {
    inner: rsa::PublicKey,
    spki_der: Vec<u8>,
}

/// An RSA private key: decrypts API keys. Its `Debug` shows only its size and fingerprint.
#[derive(Clone)]
pub struct PrivateKey {
    inner: rsa::PrivateKey,
    public: PublicKey,
}

impl PublicKey {
    fn new(inner: rsa::PublicKey) -> Result<Self, CryptoError> {
        let bits = bits_of(&inner);
        if bits < MIN_KEY_BITS {
            return Err(CryptoError::KeyTooSmall { bits });
        }
        let spki_der = inner
            .to_public_key_der()
            .map_err(|e| CryptoError::Encoding(e.to_string()))?
            .into_vec();
        Ok(PublicKey { inner, spki_der })
    }

    /// Reads a PEM public key: `PUBLIC KEY` (SubjectPublicKeyInfo) or `RSA PUBLIC KEY`
    /// (PKCS#1). A private key PEM file works too: its public half is used.
    pub fn from_pem(pem: &[u8]) -> Result<PublicKey, CryptoError> {
        const EXPECTED: &str = "an RSA public key (PUBLIC KEY or RSA PUBLIC KEY)";
        let blocks = pem_blocks(pem, "PUBLIC KEY")?;
        for block in &blocks {
            let inner = match block.label.as_str() {
                "PUBLIC KEY" => {
                    let der = block.der()?;
                    let info = SubjectPublicKeyInfoRef::try_from(der.as_slice())
                        .map_err(|e| block.damaged(e))?;
                    check_algorithm(info.algorithm.oid)?;
                    rsa::PublicKey::from_public_key_der(&der)
                        .map_err(|e| CryptoError::InvalidKey(e.to_string()))?
                }
                "RSA PUBLIC KEY" => rsa::PublicKey::from_pkcs1_der(&block.der()?)
                    .map_err(|e| CryptoError::InvalidKey(e.to_string()))?,
                label if is_private_label(label) => {
                    return Ok(PrivateKey::from_block(block)?.public_key());
                }
                _ => continue,
            };
            return PublicKey::new(inner);
        }
        Err(wrong_kind(&blocks, EXPECTED))
    }

    /// Encrypts an API key into an ApiKey revision's `data`.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<String, CryptoError> {
        if plaintext.is_empty() {
            return Err(CryptoError::EmptyPlaintext);
        }
        let max = self.max_plaintext_len();
        if plaintext.len() > max {
            return Err(CryptoError::PlaintextTooLong {
                len: plaintext.len(),
                max,
                bits: self.bits(),
            });
        }
        let ciphertext = self
            .inner
            .encrypt(&mut SysRng, padding(), plaintext)
            .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
        Ok(STANDARD.encode(to_hex(&ciphertext)))
    }

    /// The longest API key this key encrypts, in bytes.
    pub fn max_plaintext_len(&self) -> usize {
        self.inner.size() - OAEP_OVERHEAD
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        bits_of(&self.inner)
    }

    /// Lowercase hex of the first 8 bytes of the SHA-256 of the DER SubjectPublicKeyInfo:
    /// names the key pair without showing it.
    pub fn fingerprint(&self) -> String {
        to_hex(&Sha256::digest(&self.spki_der)[..8])
    }

    /// The key as PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn to_spki_pem(&self) -> String {
        // Encoded by hand from the DER kept for the fingerprint, so that this cannot fail.
        let body = STANDARD.encode(&self.spki_der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.extend(line.iter().map(|&b| char::from(b)));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("bits", &self.bits())
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl PrivateKey {
    fn new(inner: rsa::PrivateKey) -> Result<Self, CryptoError> {
        let public = PublicKey::new(inner.to_public_key())?;
        Ok(PrivateKey { inner, public })
    }

    /// Reads an unencrypted PEM RSA private key: `RSA PRIVATE KEY` (PKCS#1) or `PRIVATE KEY`
    /// (PKCS#8, what OpenSSL 3 writes by default).
    pub fn from_pem(pem: &[u8]) -> Result<PrivateKey, CryptoError> {
        const EXPECTED: &str = "an RSA private key (RSA PRIVATE KEY or PRIVATE KEY)";
        let blocks = pem_blocks(pem, "PRIVATE KEY")?;
        match blocks.iter().find(|b| is_private_label(&b.label)) {
            Some(block) => PrivateKey::from_block(block),
            None => Err(wrong_kind(&blocks, EXPECTED)),
        }
    }

    fn from_block(block: &PemBlock) -> Result<PrivateKey, CryptoError> {
        if block.encrypted {
            return Err(CryptoError::EncryptedKey);
        }
        let inner = match block.label.as_str() {
            "RSA PRIVATE KEY" => rsa::PrivateKey::from_pkcs1_der(&block.der()?)
                .map_err(|e| CryptoError::InvalidKey(e.to_string()))?,
            "PRIVATE KEY" => {
                let der = block.der()?;
                let info =
                    PrivateKeyInfoRef::try_from(der.as_slice()).map_err(|e| block.damaged(e))?;
                check_algorithm(info.algorithm.oid)?;
                rsa::PrivateKey::from_pkcs8_der(&der)
                    .map_err(|e| CryptoError::InvalidKey(e.to_string()))?
            }
            "ENCRYPTED PRIVATE KEY" => return Err(CryptoError::EncryptedKey),
            "OPENSSH PRIVATE KEY" => {
                return Err(CryptoError::WrongPemKind {
                    found: "an OpenSSH private key".to_owned(),
                    expected: "a PEM key (`ssh-keygen -p -m PKCS8 -f KEY` converts an RSA one)",
                });
            }
            other => {
                return Err(CryptoError::NotRsa {
                    algorithm: format!("PEM block {other:?}"),
                });
            }
        };
        PrivateKey::new(inner)
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        self.public.clone()
    }

    /// Decrypts an ApiKey revision's `data` (surrounding whitespace is ignored).
    pub fn decrypt(&self, data: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let expected = self.inner.size();
        let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        if compact.is_empty() {
            return Err(CryptoError::NotBase64("it is empty".to_owned()));
        }
        let hex = match BASE64_LENIENT.decode(&compact) {
            Ok(hex) => hex,
            Err(e) => {
                let unpadded = compact.trim_end_matches('=');
                // Only base64 letters, yet undecodable: the text was cut at a length base64
                // cannot end on. Saying "truncated" helps more than a base64 error.
                if unpadded.bytes().all(is_base64_letter) {
                    return Err(CryptoError::CiphertextLength {
                        got: unpadded.len() * 3 / 4 / 2,
                        expected,
                    });
                }
                return Err(CryptoError::NotBase64(e.to_string()));
            }
        };
        let ciphertext = from_hex(&hex).ok_or(CryptoError::NotHex)?;
        if ciphertext.len() != expected || hex.len() % 2 != 0 {
            return Err(CryptoError::CiphertextLength {
                got: ciphertext.len(),
                expected,
            });
        }
        // Every failure past this point is the same error: telling padding failures apart
        // would hand an attacker a decryption oracle.
        self.inner
            .decrypt(padding(), &ciphertext)
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt)
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.public.bits()
    }

    /// The fingerprint of the public half (see [`PublicKey::fingerprint`]).
    pub fn fingerprint(&self) -> String {
        self.public.fingerprint()
    }

    /// The key as unencrypted PEM `PRIVATE KEY` (PKCS#8).
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, CryptoError> {
        self.inner
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| CryptoError::Encoding(e.to_string()))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("bits", &self.bits())
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// Makes an API key: `len` characters from `[0-9A-Za-z]`, drawn from the operating system's
/// random number generator.
pub fn generate_plaintext(len: usize) -> Result<Zeroizing<String>, CryptoError> {
    if len == 0 || len > MAX_GENERATED_LEN {
        return Err(CryptoError::PlaintextLength { len });
    }
    // Bytes from 248 = 4 × 62 up are dropped: keeping them would make the first 8 letters
    // of the alphabet likelier than the rest.
    const LIMIT: u8 = 248;
    let mut key = Zeroizing::new(String::with_capacity(len));
    let mut random = Zeroizing::new([0u8; 64]);
    while key.len() < len {
        getrandom::fill(&mut random[..]).map_err(|e| CryptoError::Random(e.to_string()))?;
        for &byte in random.iter().filter(|&&b| b < LIMIT).take(len - key.len()) {
            key.push(char::from(ALPHABET[usize::from(byte % 62)]));
        }
    }
    Ok(key)
}

/// Generates an RSA key pair of 2048, 3072 or 4096 bits (public exponent 65537).
pub fn generate_keypair(bits: usize) -> Result<PrivateKey, CryptoError> {
    if !KEY_SIZES.contains(&bits) {
        return Err(CryptoError::UnsupportedKeySize { bits });
    }
    let inner = rsa::PrivateKey::new(&mut SysRng, bits)
        .map_err(|e| CryptoError::KeyGeneration(e.to_string()))?;
    PrivateKey::new(inner)
}

fn padding() -> Oaep<Sha256> {
    Oaep::new_with_label(LABEL)
}

fn bits_of(key: &rsa::PublicKey) -> usize {
    key.n().bit_width() as usize
}

fn check_algorithm(oid: ObjectIdentifier) -> Result<(), CryptoError> {
    if oid == RSA_ENCRYPTION {
        return Ok(());
    }
    let algorithm = match oid.to_string().as_str() {
        "1.2.840.10045.2.1" => "EC".to_owned(),
        "1.3.101.110" => "X25519".to_owned(),
        "1.3.101.112" => "Ed25519".to_owned(),
        "1.3.101.113" => "Ed448".to_owned(),
        "1.2.840.10040.4.1" => "DSA".to_owned(),
        "1.2.840.113549.1.1.10" => "RSASSA-PSS, for signatures only".to_owned(),
        other => format!("algorithm OID {other}"),
    };
    Err(CryptoError::NotRsa { algorithm })
}

fn is_private_label(label: &str) -> bool {
    label.ends_with("PRIVATE KEY")
}

fn is_base64_letter(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

fn wrong_kind(blocks: &[PemBlock], expected: &'static str) -> CryptoError {
    let labels: Vec<String> = blocks.iter().map(|b| format!("{:?}", b.label)).collect();
    let mut found = format!("PEM blocks {}", labels.join(", "));
    if blocks.iter().any(|b| b.label == "CERTIFICATE") {
        found.push_str(
            " (to take the public key out of a certificate: `openssl x509 -pubkey -noout -in CERT`)",
        );
    }
    CryptoError::WrongPemKind { found, expected }
}

/// One `-----BEGIN X-----` … `-----END X-----` block of a PEM file.
struct PemBlock {
    label: String,
    /// RFC 1421 headers said `Proc-Type: 4,ENCRYPTED` (OpenSSL's legacy encrypted PKCS#1).
    encrypted: bool,
    body: String,
}

impl PemBlock {
    fn der(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        STANDARD
            .decode(&self.body)
            .map(Zeroizing::new)
            .map_err(|e| self.damaged(e))
    }

    fn damaged(&self, reason: impl fmt::Display) -> CryptoError {
        CryptoError::BadPem {
            label: self.label.clone(),
            reason: reason.to_string(),
        }
    }
}

/// Splits a PEM file into its blocks. Text around the blocks (OpenSSL's "Bag Attributes", a
/// comment) is skipped, as OpenSSL does.
fn pem_blocks(pem: &[u8], expected: &'static str) -> Result<Vec<PemBlock>, CryptoError> {
    let text = std::str::from_utf8(pem).map_err(|_| CryptoError::NotPem { expected })?;
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut block = PemBlock {
            label: label.to_owned(),
            encrypted: false,
            body: String::new(),
        };
        let mut closed = false;
        for line in lines.by_ref() {
            if line == end {
                closed = true;
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.trim() == "Proc-Type" && value.contains("ENCRYPTED") {
                    block.encrypted = true;
                }
                continue;
            }
            block.body.push_str(line);
        }
        if !closed {
            return Err(block.damaged(format!("no {end} line")));
        }
        blocks.push(block);
    }
    if blocks.is_empty() {
        return Err(CryptoError::NotPem { expected });
    }
    Ok(blocks)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    hex
}

/// Decodes hex (either letter case); an odd last digit is dropped, for the length check to
/// report. `None` when a byte is not a hex digit.
fn from_hex(hex: &[u8]) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    hex.chunks_exact(2)
        .map(|pair| Some((digit(pair[0])? << 4) | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests;

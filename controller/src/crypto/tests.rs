//! Unit tests of the API-key cryptography.

use std::sync::OnceLock;
use std::time::Instant;

use rsa::pkcs1::EncodeRsaPublicKey as _;

use super::*;

/// `openssl genrsa -traditional 2048`.
const PKCS1_KEY: &str = "\
-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEA51Rw8ZWIs5oqHDFYMicoOPHRaATCElxHdhxflu2uXHuGS2VM
qIJXpLF2Fa3Cd2IfpcSGy3fiH0CfTeDh9QOpggdh1vjeAxO+2UeMsY99lehOLqIj
GJxMn1TjMM+gSeOA7vpY1+E/Nqgkutz3f4WVSZJrkgZLaqe5pEmes9zHEqX7OoEi
UEvrJVHW0FPWMjp5Wn1fkT+o+52QBWbLARlQyEulCHvkPwAWs3YXMzds4yFn3mJd
MmO0PMMgpMIlz7UEujYVhFUrMNjJDSphYiFh473aBnFFjhxT/k8b7UNJKC4mA3K7
niTPbvqaoXpKIHgarZrPDtWCCZd1jR+uwYQA6QIDAQABAoH/UIKITG+7EjjDoOi2
N4ViKIvkUhMAhnisrXI5p99tTB8VIb2/whCbE7ovlCoo5EBF2MR7bHiXdrO1L6ID
AiMV7WCdPmmChc+kIAH8Md4s9yZ7gRvXhcr8fEzZmopve0fLjSfUEhVWWQhPo8eR
+EUz1wAbE6ykRIwwocB9lFupbSxRdDPWF2fK1iRk2KaqibO8OLcxZWqORp2FMdJS
YwB+1NQ0lTSGmce6Kj0PqTC2Gzt9joacsMN5+tQsvN12pP1CRt3DROJWDzCF3ByF
G9w85J9VRgdYb8x8TSxTfs6Y2k5b/DCaz47L2obXCXi6YitnBUWzE1J5E+/uYmQ2
fHIRAoGBAPa1egHF+qvgJfVCqzYEMyvoFY4uqRof1NKinjnpN61qui4UGyMMAYLP
n1JCqM8fcZXTRWIV6936iDIrJK9TAgDcyNBmnk4S6ccIeTyp6+KAyiMBBE2zsRgl
9JrlzoA4Uxeva2NngeL2GxlQ5qnCFA0wgOtD4O0TJap2K5naWEeZAoGBAPAKse5U
3c/+hpCdxXtxFz0QsjW1R6Q3HgwHab3eUul7NGCAWPCv3FBJTMLqAh0NPIgk2JM2
NLahxF1DgdQAFmFmOcvuKabOmwIJQSb1xQC2t9gLIVzWDcG5Aorrsp0jsWw6vw4l
K1XrjdGptdziYFujTvizyYsS4GNTpFlBYhXRAoGBAPOAaTzI2MK+CRkLRYuaF5u1
hVkBqvxTAK8pvHwyOTccCUkjpSkxV2hyXrFFg/Jy+ZxEm83VDynYdob12E6H4olR
YY94SbWLq1w8e9Upbd3w+hIUldfPjPLlu4kLW4dokHLnPFovtp56BIM3O4PAQCRI
hGYxaBb2+A1Id35yaQG5AoGBAJJSIqYiK1fXUhWjZrbZeA3sOIWOrE4InxM8DZQE
isvyIzpT4mNM/+Ic3GLQHFuzLtvagf4yg610LGuhc+lT6FCU7NRHqDIbLNfv5jwm
gmDuAGD8X+jkPlyBN3CRPj6VfFh58u5fb+we+0L7zXUItS4G/WOSzF8vMYK6gKs7
tNuRAoGBAMTa23x21Xye9tbTFNWY9NoxQL69xvkL2NtT9fOheEOYDJdtNE0uDr2O
zs/QFmaGwSkRhtBKZsGlZYNBSCbekNYL9FULCR3O54P02nr4O6BhKq/4UEirrfnd
+N16PCi/gnbVKB41Pkl5QTHGvT2iBKxwNVwmqVNurrAJR8pOHwu0
-----END RSA PRIVATE KEY-----
";

/// The same key, `openssl pkcs8 -topk8 -nocrypt`.
const PKCS8_KEY: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDnVHDxlYizmioc
MVgyJyg48dFoBMISXEd2HF+W7a5ce4ZLZUyogleksXYVrcJ3Yh+lxIbLd+IfQJ9N
4OH1A6mCB2HW+N4DE77ZR4yxj32V6E4uoiMYnEyfVOMwz6BJ44Du+ljX4T82qCS6
3Pd/hZVJkmuSBktqp7mkSZ6z3McSpfs6gSJQS+slUdbQU9YyOnlafV+RP6j7nZAF
ZssBGVDIS6UIe+Q/ABazdhczN2zjIWfeYl0yY7Q8wyCkwiXPtQS6NhWEVSsw2MkN
KmFiIWHjvdoGcUWOHFP+TxvtQ0koLiYDcrueJM9u+pqhekogeBqtms8O1YIJl3WN
H67BhADpAgMBAAECgf9QgohMb7sSOMOg6LY3hWIoi+RSEwCGeKytcjmn321MHxUh
vb/CEJsTui+UKijkQEXYxHtseJd2s7UvogMCIxXtYJ0+aYKFz6QgAfwx3iz3JnuB
G9eFyvx8TNmaim97R8uNJ9QSFVZZCE+jx5H4RTPXABsTrKREjDChwH2UW6ltLFF0
M9YXZ8rWJGTYpqqJs7w4tzFlao5GnYUx0lJjAH7U1DSVNIaZx7oqPQ+pMLYbO32O
hpyww3n61Cy83Xak/UJG3cNE4lYPMIXcHIUb3Dzkn1VGB1hvzHxNLFN+zpjaTlv8
MJrPjsvahtcJeLpiK2cFRbMTUnkT7+5iZDZ8chECgYEA9rV6AcX6q+Al9UKrNgQz
K+gVji6pGh/U0qKeOek3rWq6LhQbIwwBgs+fUkKozx9xldNFYhXr3fqIMiskr1MC
ANzI0GaeThLpxwh5PKnr4oDKIwEETbOxGCX0muXOgDhTF69rY2eB4vYbGVDmqcIU
DTCA60Pg7RMlqnYrmdpYR5kCgYEA8Aqx7lTdz/6GkJ3Fe3EXPRCyNbVHpDceDAdp
vd5S6Xs0YIBY8K/cUElMwuoCHQ08iCTYkzY0tqHEXUOB1AAWYWY5y+4pps6bAglB
JvXFALa32AshXNYNwbkCiuuynSOxbDq/DiUrVeuN0am13OJgW6NO+LPJixLgY1Ok
WUFiFdECgYEA84BpPMjYwr4JGQtFi5oXm7WFWQGq/FMArym8fDI5NxwJSSOlKTFX
aHJesUWD8nL5nESbzdUPKdh2hvXYTofiiVFhj3hJtYurXDx71Slt3fD6EhSV18+M
8uW7iQtbh2iQcuc8Wi+2nnoEgzc7g8BAJEiEZjFoFvb4DUh3fnJpAbkCgYEAklIi
piIrV9dSFaNmttl4Dew4hY6sTgifEzwNlASKy/IjOlPiY0z/4hzcYtAcW7Mu29qB
/jKDrXQsa6Fz6VPoUJTs1EeoMhss1+/mPCaCYO4AYPxf6OQ+XIE3cJE+PpV8WHny
7l9v7B77QvvNdQi1Lgb9Y5LMXy8xgrqAqzu025ECgYEAxNrbfHbVfJ721tMU1Zj0
2jFAvr3G+QvY21P186F4Q5gMl200TS4OvY7Oz9AWZobBKRGG0EpmwaVlg0FIJt6Q
1gv0VQsJHc7ng/Taevg7oGEqr/hQSKut+d343Xo8KL+CdtUoHjU+SXlBMca9PaIE
rHA1XCapU26usAlHyk4fC7Q=
-----END PRIVATE KEY-----
";

/// `openssl genrsa -traditional 1024`.
const SMALL_KEY: &str = "\
-----BEGIN RSA PRIVATE KEY-----
MIICXQIBAAKBgQDko6LYGb+yUPdPqAPYUSAUqtB6KnvTx10ZD12YgeNLsWj400q8
JwpZRkmH35L6DL5IYx1/VLRaDsJCSWzyW69Kr7qAhzeMOCPFRwfrq1XVop25g8um
jEGGxOcOPxOsY4J4jAIrdK9Q0afFW9kX3FjyN+Pttqfx4cp5J2zPYB46lwIDAQAB
AoGBANIUTNdU6V91p5eIYGgNOnXi8YWerYJMp40UIkKz7d4p17LxqbSyBn865usy
kYCx3tDySTMq6D/rWbDAeJtDhQ5VSCFE5RrHws+WNVndnN78e3vjjMaZzt1rXUI8
0Fd8cwLh5LJtqiJBT465DzxgoabL3BURrZlyQeSR65S9CPb5AkEA84/xm13+/NQO
PpemCsvtK4RbS29c1P8QYZVvtX8mzOXA8c11W6KKmf1UQgQEisjq78d3j6Z4M44L
99Z5APk1gwJBAPBQmuFL6JaXtHGf0FjNtII6Gwyzf5CB0p5mf8MTj9fklGF9wFrM
SFSgWnS2XL5DhThCNYRJ/Bxfb8aVf0Dy7l0CQAetl/4/3lP2E2ThvvhEKXvftkkQ
f6qvR8LrxRPBqGV5MLXuti5nV1s3YzqZidMeNlnMvfYnV064waPUfQgM0yUCQExQ
jJ63SGlqS7c5lSReTtB8O1LRPdVaJNSAoFoGwEtDH4vGL2umK+IT+iXOM62IK6ot
/GjCRfmMpSZfG0Y431ECQQC11YIwuMpQzosL9AM5kOICXBS63AVLfiId/WCLuihr
QGQFilqLEf6C6VxXS5adk6ioHporeN6goT7im84AyOJM
-----END RSA PRIVATE KEY-----
";

/// A P-256 key in PKCS#8.
const EC_KEY: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQge4lO/0mC/H//X9vV
UWIdVPIbyYc6Svc2koZQbPT5c3qhRANCAAT2jsD1XxZQFllbs+tWky5IxLgEsTho
WnO5fdyh+Zirjts/hw6rfrCYmpGEJLOM8G9n6jsMuyxoELwn3HVaY8dg
-----END PRIVATE KEY-----
";

/// `openssl pkey -in PKCS1_KEY -pubout -outform DER | sha256sum`, first 16 digits.
const FINGERPRINT: &str = "b97a8816b19b4c08";

fn key() -> PrivateKey {
    PrivateKey::from_pem(PKCS1_KEY.as_bytes()).unwrap()
}

/// Key generation takes seconds in debug builds: one generated key serves every test.
fn generated_key() -> &'static PrivateKey {
    static KEY: OnceLock<PrivateKey> = OnceLock::new();
    KEY.get_or_init(|| generate_keypair(2048).unwrap())
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

#[test]
fn round_trip() {
    let key = key();
    let data = key.public_key().encrypt(b"s3cr3t").unwrap();
    assert_eq!(data.len(), 684, "256 bytes → 512 hex digits → 684 base64");
    assert!(data.ends_with('='), "padded base64: {data}");
    assert!(is_lower_hex(&STANDARD.decode(&data).unwrap()));
    assert_eq!(&**key.decrypt(&data).unwrap(), b"s3cr3t");
    assert_eq!(
        &**key.decrypt(&format!(" \n{data}\r\n")).unwrap(),
        b"s3cr3t"
    );
    assert_ne!(
        data,
        key.public_key().encrypt(b"s3cr3t").unwrap(),
        "OAEP is randomized"
    );
}

#[test]
fn pkcs1_and_pkcs8_load_the_same_key() {
    let pkcs1 = key();
    let pkcs8 = PrivateKey::from_pem(PKCS8_KEY.as_bytes()).unwrap();
    assert_eq!(pkcs1.fingerprint(), FINGERPRINT);
    assert_eq!(pkcs8.fingerprint(), FINGERPRINT);
    assert_eq!(pkcs1.bits(), 2048);
    let data = pkcs1.public_key().encrypt(b"x").unwrap();
    assert_eq!(&**pkcs8.decrypt(&data).unwrap(), b"x");
}

#[test]
fn public_key_formats() {
    let public = key().public_key();
    let spki = public.to_spki_pem();
    assert_eq!(
        spki,
        *public.inner.to_public_key_pem(LineEnding::LF).unwrap()
    );
    let pkcs1 = public.inner.to_pkcs1_pem(LineEnding::LF).unwrap();
    assert!(pkcs1.starts_with("-----BEGIN RSA PUBLIC KEY-----"));
    for pem in [spki.as_str(), &pkcs1, PKCS1_KEY, PKCS8_KEY] {
        let loaded = PublicKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(loaded.fingerprint(), FINGERPRINT, "{pem}");
    }
    let with_text = format!("Bag Attributes\n    localKeyID: 01\n{spki}trailing text\n");
    PublicKey::from_pem(with_text.as_bytes()).unwrap();
}

#[test]
fn wrong_key_is_a_decryption_error() {
    let data = generated_key().public_key().encrypt(b"x").unwrap();
    let err = key().decrypt(&data).unwrap_err();
    assert!(matches!(err, CryptoError::Decrypt), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot decrypt: encrypted for a different public key, or the data is corrupt"
    );
}

#[test]
fn truncated_or_padded_data_is_a_length_error() {
    let key = key();
    let data = key.public_key().encrypt(b"x").unwrap();
    let err = key.decrypt(&data[..data.len() / 2]).unwrap_err();
    assert!(
        matches!(
            err,
            CryptoError::CiphertextLength {
                got: 128,
                expected: 256
            }
        ),
        "{err:?}"
    );
    let hex = STANDARD.decode(&data).unwrap();
    let chopped = STANDARD.encode(&hex[..hex.len() - 2]);
    let err = key.decrypt(&chopped).unwrap_err();
    assert!(err.to_string().starts_with(
        "255 bytes of ciphertext, expected 256 for this key (a 2048-bit key makes 256)"
    ));
    let odd = STANDARD.encode(&hex[..hex.len() - 1]);
    let err = key.decrypt(&odd).unwrap_err();
    assert!(
        matches!(err, CryptoError::CiphertextLength { got: 255, .. }),
        "{err:?}"
    );
    let padded = STANDARD.encode([&hex[..], b"00"].concat());
    let err = key.decrypt(&padded).unwrap_err();
    assert!(
        matches!(err, CryptoError::CiphertextLength { got: 257, .. }),
        "{err:?}"
    );
}

#[test]
fn not_base64() {
    for data in ["not base64!", "", " \n", "a%b="] {
        let err = key().decrypt(data).unwrap_err();
        assert!(
            matches!(err, CryptoError::NotBase64(_)),
            "{data:?}: {err:?}"
        );
        assert!(err.to_string().starts_with("the data is not base64"));
    }
}

#[test]
fn base64_of_non_hex() {
    let raw = STANDARD.encode([0xa5u8; 256]);
    let text = STANDARD.encode("hex? no: this is text");
    for data in [raw, text] {
        let err = key().decrypt(&data).unwrap_err();
        assert!(matches!(err, CryptoError::NotHex), "{err:?}");
    }
}

#[test]
fn uppercase_hex_and_missing_padding_are_read() {
    let key = key();
    let data = key.public_key().encrypt(b"x").unwrap();
    let upper = STANDARD.decode(&data).unwrap().to_ascii_uppercase();
    let unpadded = STANDARD.encode(upper).trim_end_matches('=').to_owned();
    assert_eq!(&**key.decrypt(&unpadded).unwrap(), b"x");
}

#[test]
fn another_label_does_not_decrypt() {
    let key = key();
    let public = &key.public_key().inner;
    let other = Oaep::<Sha256>::new_with_label(&b"kanali2"[..]);
    let unlabelled = Oaep::<Sha256>::new();
    for padding in [other, unlabelled] {
        let ciphertext = public.encrypt(&mut SysRng, padding, b"x").unwrap();
        let err = key
            .decrypt(&STANDARD.encode(to_hex(&ciphertext)))
            .unwrap_err();
        assert!(matches!(err, CryptoError::Decrypt), "{err:?}");
    }
}

#[test]
fn plaintext_length_limits() {
    let public = key().public_key();
    assert_eq!(public.max_plaintext_len(), 190);
    public.encrypt(&[b'a'; 190]).unwrap();
    let err = public.encrypt(&[b'a'; 191]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the API key is 191 bytes long; a 2048-bit key encrypts at most 190"
    );
    assert!(matches!(
        public.encrypt(b""),
        Err(CryptoError::EmptyPlaintext)
    ));
}

#[test]
fn generated_plaintext() {
    let a = generate_plaintext(32).unwrap();
    let b = generate_plaintext(32).unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(*a, *b);
    assert_eq!(generate_plaintext(190).unwrap().len(), 190);
    // 65 × 190 draws: each of the 62 letters turns up, barring a 1-in-e^200 fluke.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..65 {
        seen.extend(generate_plaintext(190).unwrap().bytes());
    }
    assert_eq!(seen.into_iter().collect::<Vec<u8>>(), ALPHABET.to_vec());
    for len in [0, 191] {
        let err = generate_plaintext(len).unwrap_err();
        assert!(
            matches!(err, CryptoError::PlaintextLength { .. }),
            "{err:?}"
        );
    }
}

#[test]
fn generated_keys() {
    let key = generated_key();
    assert_eq!(key.bits(), 2048);
    let reloaded = PrivateKey::from_pem(key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
    assert_eq!(reloaded.fingerprint(), key.fingerprint());
    let public = PublicKey::from_pem(key.public_key().to_spki_pem().as_bytes()).unwrap();
    let data = public.encrypt(b"x").unwrap();
    assert_eq!(&**reloaded.decrypt(&data).unwrap(), b"x");
    for bits in [1024, 2047, 8192] {
        let err = generate_keypair(bits).unwrap_err();
        assert!(
            matches!(err, CryptoError::UnsupportedKeySize { .. }),
            "{err:?}"
        );
    }
}

/// 3072 bits is the default of `kanalictl keypair generate`; generating one takes a
/// while in debug builds.
#[test]
fn generated_3072_bit_key() {
    let key = generate_keypair(3072).unwrap();
    assert_eq!(key.bits(), 3072);
    assert_eq!(key.public_key().max_plaintext_len(), 318);
}

#[test]
fn unusable_key_files() {
    type Expected = fn(&CryptoError) -> bool;
    let cases: [(&str, Expected); 7] = [
        ("no key here", |e| matches!(e, CryptoError::NotPem { .. })),
        (
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
            |e| matches!(e, CryptoError::EncryptedKey),
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00\n\nMIIB\n-----END RSA PRIVATE KEY-----\n",
            |e| matches!(e, CryptoError::EncryptedKey),
        ),
        (
            EC_KEY,
            |e| matches!(e, CryptoError::NotRsa { algorithm } if algorithm == "EC"),
        ),
        (SMALL_KEY, |e| {
            matches!(e, CryptoError::KeyTooSmall { bits: 1024 })
        }),
        (
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            |e| matches!(e, CryptoError::WrongPemKind { .. }),
        ),
        ("-----BEGIN PRIVATE KEY-----\nMIIB\n", |e| {
            matches!(e, CryptoError::BadPem { .. })
        }),
    ];
    for (pem, expected) in cases {
        let err = PrivateKey::from_pem(pem.as_bytes()).unwrap_err();
        assert!(expected(&err), "{pem}: {err:?}");
    }
    let err = PublicKey::from_pem(SMALL_KEY.as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the RSA key has 1024 bits; at least 2048 are required"
    );
    let err = PublicKey::from_pem(EC_KEY.as_bytes()).unwrap_err();
    assert!(matches!(err, CryptoError::NotRsa { .. }), "{err:?}");
}

#[test]
fn debug_shows_no_key_material() {
    let shown = format!("{:?}", key());
    assert_eq!(
        shown,
        format!("PrivateKey {{ bits: 2048, fingerprint: \"{FINGERPRINT}\", .. }}")
    );
}

/// `cargo test --release -p kanali-controller --lib crypto::tests::decrypt_speed --
/// --ignored --nocapture`: the controller decrypts every revision at start-up.
#[test]
#[ignore = "a measurement, meaningful in release builds only"]
fn decrypt_speed() {
    let keys = [key(), generate_keypair(3072).unwrap()];
    for key in keys {
        let data = key
            .public_key()
            .encrypt(b"0123456789abcdef0123456789abcdef")
            .unwrap();
        key.decrypt(&data).unwrap();
        const N: u32 = 200;
        let started = Instant::now();
        for _ in 0..N {
            key.decrypt(&data).unwrap();
        }
        let each = started.elapsed() / N;
        eprintln!(
            "{} bits: {each:?} per decrypt, {:?} for 100 000 revisions on one core",
            key.bits(),
            each * 100_000
        );
    }
}

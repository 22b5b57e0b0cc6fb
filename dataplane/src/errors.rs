//! The fifteen Kanali error codes and their wire form.
//!
//! Clients and the v2 end-to-end suite compare the JSON body field by field, so the bodies are
//! spelled out here once, byte for byte as v2 formats them (spec §2.8, §2.9), including the
//! grammatical oddities of the messages. Every body is a `&'static str` built at compile time, so
//! rendering an error on the request path costs no allocation for the body.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

/// Generates the enum and its lookup tables from one table, so a code's number, status, message
/// and body can never drift apart.
macro_rules! error_codes {
    ($(
        $(#[$doc:meta])*
        $name:ident = $code:literal, $nn:literal, $status:ident, $status_num:literal, $msg:literal;
    )*) => {
        /// A Kanali error code (`00`–`14`), as rendered to clients in place of an upstream
        /// response.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
        }

        impl ErrorCode {
            /// Every code in numeric order, for callers that need to enumerate them (metrics
            /// labels, docs, tests).
            pub const ALL: [ErrorCode; 15] = [$( ErrorCode::$name, )*];

            /// The code with this number, or `None` outside `0..=14`.
            pub const fn from_code(code: u32) -> Option<ErrorCode> {
                match code {
                    $( $code => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// The number sent in the body's `code` field.
            pub const fn code(self) -> u32 {
                match self {
                    $( ErrorCode::$name => $code, )*
                }
            }

            /// The HTTP status of the error response.
            pub const fn status(self) -> StatusCode {
                match self {
                    $( ErrorCode::$name => StatusCode::$status, )*
                }
            }

            /// The literal v2 message; clients match on it, so it must not be "fixed".
            pub const fn message(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => $msg, )*
                }
            }

            /// The complete JSON body, formatted exactly like v2 (fixed key order, no
            /// whitespace, no trailing newline).
            pub const fn body(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => concat!(
                        "{\"status\":", $status_num,
                        ",\"message\":\"", $msg,
                        "\",\"code\":", $code,
                        ",\"details\":\"Visit https://kanali.io/docs/v2/errorcodes/#", $nn,
                        " for more details.\"}"
                    ), )*
                }
            }
        }
    };
}

error_codes! {
    /// `00`: no route matched the request.
    NoApiProxy = 0, "00", NOT_FOUND, 404, "No ApiProxy resource was not found that matches the request.";
    /// `01`: any failure that has no more specific code, including caught panics.
    Unknown = 1, "01", INTERNAL_SERVER_ERROR, 500, "An unknown error occurred.";
    /// `02`: the route's mock target has no response for this request.
    NoMockTarget = 2, "02", NOT_FOUND, 404, "No MockTarget resource was not found that matches the request.";
    /// `03`: a plugin could not be loaded.
    PluginOpen = 3, "03", INTERNAL_SERVER_ERROR, 500, "Could not open or load plugin.";
    /// `04`: a plugin does not export its entry point.
    PluginSymbol = 4, "04", INTERNAL_SERVER_ERROR, 500, "Could not lookup plugin symbol.";
    /// `05`: a plugin's entry point has the wrong type.
    PluginInterface = 5, "05", INTERNAL_SERVER_ERROR, 500, "Plugin does not implement the correct interface.";
    /// `06`: the upstream TLS secret is missing or unusable.
    Secret = 6, "06", INTERNAL_SERVER_ERROR, 500, "Could not retrieve Kubernetes secret.";
    /// `07`: the upstream TLS certificate and key do not form a pair.
    KeyPair = 7, "07", INTERNAL_SERVER_ERROR, 500, "Could not create x509 key pair.";
    /// `08`: the upstream could not be reached or gave no valid response.
    Upstream = 8, "08", BAD_GATEWAY, 502, "Could not get a valid or any response from the upstream server.";
    /// `09`: looking up the upstream Service failed.
    ServiceLookup = 9, "09", INTERNAL_SERVER_ERROR, 500, "Could not retrieve Kubernetes services.";
    /// `10`: no Service matched the route's backend.
    NoService = 10, "10", INTERNAL_SERVER_ERROR, 500, "Could not retrieve any matching Kubernetes services.";
    /// `11`: a plugin failed while running.
    PluginRuntime = 11, "11", INTERNAL_SERVER_ERROR, 500, "Plugin threw a runtime error.";
    /// `12`: the request carries no API key; v2 deliberately says nothing more.
    ApiKeyMissing = 12, "12", FORBIDDEN, 403, "My lips are sealed.";
    /// `13`: the API key is unknown or not granted this request.
    ApiKeyUnauthorized = 13, "13", UNAUTHORIZED, 401, "Api key is not authorized.";
    /// `14`: the API key exceeded its rate limit or quota.
    RateLimited = 14, "14", TOO_MANY_REQUESTS, 429, "The Api key you are using has exceeded its rate limit.";
}

impl ErrorCode {
    /// The complete error response; the body points at static memory, so nothing is copied.
    pub fn response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(Bytes::from_static(self.body().as_bytes())));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // For the metrics and the access log, which see only the response. Only error
        // responses pay for the extension map; the others' stays unallocated.
        response.extensions_mut().insert(self);
        response
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}: {}", self.code(), self.message())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// The §2.9 table, typed in independently of the macro above.
    const TABLE: [(u32, u16, &str); 15] = [
        (
            0,
            404,
            "No ApiProxy resource was not found that matches the request.",
        ),
        (1, 500, "An unknown error occurred."),
        (
            2,
            404,
            "No MockTarget resource was not found that matches the request.",
        ),
        (3, 500, "Could not open or load plugin."),
        (4, 500, "Could not lookup plugin symbol."),
        (5, 500, "Plugin does not implement the correct interface."),
        (6, 500, "Could not retrieve Kubernetes secret."),
        (7, 500, "Could not create x509 key pair."),
        (
            8,
            502,
            "Could not get a valid or any response from the upstream server.",
        ),
        (9, 500, "Could not retrieve Kubernetes services."),
        (
            10,
            500,
            "Could not retrieve any matching Kubernetes services.",
        ),
        (11, 500, "Plugin threw a runtime error."),
        (12, 403, "My lips are sealed."),
        (13, 401, "Api key is not authorized."),
        (
            14,
            429,
            "The Api key you are using has exceeded its rate limit.",
        ),
    ];

    #[derive(Debug, PartialEq)]
    enum Json {
        Str(String),
        Int(i64),
    }

    /// A strict parser for a flat JSON object of strings and integers: enough to prove the
    /// bodies are valid JSON without a serde dependency in this crate.
    fn parse_flat_object(s: &str) -> Vec<(String, Json)> {
        fn string(b: &[u8], i: &mut usize) -> String {
            assert_eq!(b[*i], b'"');
            *i += 1;
            let mut out = String::new();
            loop {
                match b[*i] {
                    b'"' => {
                        *i += 1;
                        return out;
                    }
                    b'\\' => panic!("no escapes expected"),
                    c if c < 0x20 => panic!("control character in string"),
                    c => out.push(c as char),
                }
                *i += 1;
            }
        }
        let b = s.as_bytes();
        let mut i = 0;
        let mut fields = Vec::new();
        assert_eq!(b[i], b'{');
        i += 1;
        loop {
            let key = string(b, &mut i);
            assert_eq!(b[i], b':');
            i += 1;
            let value = if b[i] == b'"' {
                Json::Str(string(b, &mut i))
            } else {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let digits = &s[start..i];
                assert!(
                    digits == "0" || !digits.starts_with('0'),
                    "leading zero: {digits}"
                );
                Json::Int(digits.parse().unwrap())
            };
            fields.push((key, value));
            match b[i] {
                b',' => i += 1,
                b'}' => {
                    assert_eq!(i + 1, b.len(), "trailing bytes after object");
                    return fields;
                }
                c => panic!("unexpected {:?}", c as char),
            }
        }
    }

    #[test]
    fn every_body_is_json_with_the_table_fields() {
        assert_eq!(ErrorCode::ALL.len(), TABLE.len());
        for (code, status, message) in TABLE {
            let e = ErrorCode::from_code(code).unwrap();
            assert_eq!(e.code(), code);
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.message(), message);
            let details =
                format!("Visit https://kanali.io/docs/v2/errorcodes/#{code:02} for more details.");
            assert_eq!(
                parse_flat_object(e.body()),
                vec![
                    ("status".to_owned(), Json::Int(status.into())),
                    ("message".to_owned(), Json::Str(message.to_owned())),
                    ("code".to_owned(), Json::Int(code.into())),
                    ("details".to_owned(), Json::Str(details)),
                ],
                "{e:?}"
            );
        }
    }

    #[test]
    fn exact_bytes_of_first_and_last_code() {
        assert_eq!(
            ErrorCode::NoApiProxy.body(),
            r#"{"status":404,"message":"No ApiProxy resource was not found that matches the request.","code":0,"details":"Visit https://kanali.io/docs/v2/errorcodes/#00 for more details."}"#
        );
        assert_eq!(
            ErrorCode::RateLimited.body(),
            r#"{"status":429,"message":"The Api key you are using has exceeded its rate limit.","code":14,"details":"Visit https://kanali.io/docs/v2/errorcodes/#14 for more details."}"#
        );
    }

    #[test]
    fn statuses() {
        use ErrorCode::*;
        assert_eq!(NoApiProxy.status(), StatusCode::NOT_FOUND);
        assert_eq!(NoMockTarget.status(), StatusCode::NOT_FOUND);
        assert_eq!(Upstream.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(ApiKeyMissing.status(), StatusCode::FORBIDDEN);
        assert_eq!(ApiKeyUnauthorized.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(RateLimited.status(), StatusCode::TOO_MANY_REQUESTS);
        for e in [
            Unknown,
            PluginOpen,
            PluginSymbol,
            PluginInterface,
            Secret,
            KeyPair,
            ServiceLookup,
            NoService,
            PluginRuntime,
        ] {
            assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR, "{e:?}");
        }
    }

    #[test]
    fn from_code_round_trips_and_rejects_unknown_numbers() {
        for (i, e) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(e.code() as usize, i);
            assert_eq!(ErrorCode::from_code(e.code()), Some(e));
        }
        assert_eq!(ErrorCode::from_code(15), None);
        assert_eq!(ErrorCode::from_code(u32::MAX), None);
    }

    #[test]
    fn response_carries_status_content_type_and_static_body() {
        let response: Response<Bytes> = ErrorCode::Upstream.response();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers().len(), 1);
        assert_eq!(
            response.extensions().get::<ErrorCode>(),
            Some(&ErrorCode::Upstream)
        );
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(
            response.body().as_ref(),
            ErrorCode::Upstream.body().as_bytes()
        );
        // The body is the static string itself, not a copy of it.
        assert_eq!(
            response.body().as_ptr(),
            ErrorCode::Upstream.body().as_ptr()
        );
    }

    #[test]
    fn display_names_the_two_digit_code() {
        assert_eq!(
            ErrorCode::KeyPair.to_string(),
            "07: Could not create x509 key pair."
        );
    }
}

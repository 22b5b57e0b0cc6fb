//! Schema clean-up applied to every Kanali type, so that the generated CRD schemas are
//! structural and mean what the field docs say.
//!
//! schemars describes an `Option<T>` as "`T` or `null`" (`type: [T, "null"]`, or an `anyOf`
//! with a null branch when `T` carries its own `oneOf`). kube's generator would turn that into
//! `nullable: true`. Kanali never writes `null` (every optional field is skipped when unset),
//! and `nullable` would break the exactly-one-of rules: `required: [endpoint]` is satisfied by
//! `endpoint: null`. So optional fields are described as plain, non-nullable, not-required
//! properties instead; the API server drops explicit `null`s for such fields before validation.

use schemars::Schema;
use serde_json::{Map, Value};

/// HTTP methods accepted wherever a resource lists methods or verbs.
pub const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// Keywords whose value is a single subschema.
const SCHEMA_KEYWORDS: [&str; 3] = ["items", "additionalProperties", "not"];
/// Keywords whose value is a list of subschemas.
const SCHEMA_LIST_KEYWORDS: [&str; 3] = ["anyOf", "oneOf", "allOf"];

/// schemars transform: removes every trace of `null` from the schema, recursively.
pub(crate) fn structural(schema: &mut Schema) {
    if let Some(object) = schema.as_object_mut() {
        normalise(object);
    }
}

fn normalise(object: &mut Map<String, Value>) {
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        for property in properties.values_mut() {
            normalise_value(property);
        }
    }
    for keyword in SCHEMA_KEYWORDS {
        if let Some(subschema) = object.get_mut(keyword) {
            normalise_value(subschema);
        }
    }
    for keyword in SCHEMA_LIST_KEYWORDS {
        if let Some(Value::Array(subschemas)) = object.get_mut(keyword) {
            for subschema in subschemas {
                normalise_value(subschema);
            }
        }
    }

    unwrap_nullable_any_of(object);

    if let Some(Value::Array(types)) = object.get_mut("type") {
        types.retain(|t| t != "null");
        if let [single] = types.as_slice() {
            let single = single.clone();
            object.insert("type".to_owned(), single);
        }
    }
    if let Some(Value::Array(values)) = object.get_mut("enum") {
        values.retain(|v| !v.is_null());
    }
    object.remove("nullable");
    if let Some(Value::String(description)) = object.get_mut("description") {
        *description = reflow(description);
    }
}

fn normalise_value(value: &mut Value) {
    if let Value::Object(object) = value {
        normalise(object);
    }
}

/// `anyOf: [S, {type: null}]` becomes `S` (keywords already on the outer schema, such as the
/// field's own description, win).
fn unwrap_nullable_any_of(object: &mut Map<String, Value>) {
    let Some(Value::Array(branches)) = object.get("anyOf") else {
        return;
    };
    let non_null: Vec<&Value> = branches.iter().filter(|b| !is_null_schema(b)).collect();
    if non_null.len() != 1 || branches.len() != 2 {
        return;
    }
    let Some(Value::Object(inner)) = non_null.first().map(|v| (*v).clone()) else {
        return;
    };
    object.remove("anyOf");
    for (key, value) in inner {
        object.entry(key).or_insert(value);
    }
}

fn is_null_schema(value: &Value) -> bool {
    match value {
        Value::Object(object) => {
            object.get("type").is_some_and(|t| t == "null")
                || object
                    .get("enum")
                    .is_some_and(|e| e.as_array().is_some_and(|a| a.iter().all(Value::is_null)))
        }
        _ => false,
    }
}

/// Rust doc comments arrive with their line breaks; `kubectl explain` reads better when a
/// paragraph is one line. Single line breaks become spaces, blank lines stay paragraph breaks.
fn reflow(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|paragraph| !paragraph.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use serde_json::json;

    fn run(value: Value) -> Value {
        let mut schema = Schema::try_from(value).unwrap();
        structural(&mut schema);
        schema.to_value()
    }

    #[test]
    fn option_types_lose_null() {
        let out = run(json!({
            "type": "object",
            "properties": {
                "a": {"type": ["string", "null"], "description": "line one\nline two\n\nnext"},
                "b": {"type": "string", "enum": ["X", null], "nullable": true},
                "c": {"anyOf": [{"type": "object", "oneOf": [{"required": ["x"]}]}, {"type": "null"}],
                      "description": "outer"}
            }
        }));
        assert_eq!(
            out,
            json!({
                "type": "object",
                "properties": {
                    "a": {"type": "string", "description": "line one line two\n\nnext"},
                    "b": {"type": "string", "enum": ["X"]},
                    "c": {"type": "object", "oneOf": [{"required": ["x"]}], "description": "outer"}
                }
            })
        );
    }
}

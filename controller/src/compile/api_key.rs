//! ApiKey and ApiKeyBinding validation. Keys are enforced by a later proxy feature; until then
//! these objects are checked so their status already tells the truth about their spec.

use std::collections::BTreeSet;

use base64::Engine as _;
use kanali_crds::{ApiKey, ApiKeyBinding, Rule};

/// Problems with an ApiKey's spec.
pub fn validate_api_key(key: &ApiKey) -> Vec<String> {
    let mut errors = Vec::new();
    if key.spec.revisions.is_empty() {
        errors.push("spec.revisions must list at least one revision".to_owned());
    }
    for (i, rev) in key.spec.revisions.iter().enumerate() {
        if rev.data.is_empty() {
            errors.push(format!("spec.revisions[{i}].data must not be empty"));
        } else if base64::engine::general_purpose::STANDARD
            .decode(rev.data.trim())
            .is_err()
        {
            errors.push(format!(
                "spec.revisions[{i}].data is not base64 (expected the output of kanalictl apikey generate)"
            ));
        }
    }
    errors
}

/// Problems with an ApiKeyBinding's spec.
pub fn validate_binding(binding: &ApiKeyBinding) -> Vec<String> {
    let mut errors = Vec::new();
    if binding.spec.keys.is_empty() {
        errors.push("spec.keys must list at least one key".to_owned());
    }
    let mut seen = BTreeSet::new();
    for (i, key) in binding.spec.keys.iter().enumerate() {
        if key.name.is_empty() {
            errors.push(format!("spec.keys[{i}].name must not be empty"));
        } else if !seen.insert(key.name.as_str()) {
            errors.push(format!(
                "spec.keys[{i}]: key {:?} is listed more than once",
                key.name
            ));
        }
        if let Some(rule) = &key.default_rule {
            check_rule(rule, &format!("spec.keys[{i}].defaultRule"), &mut errors);
        }
        for (j, sub) in key.subpaths.iter().enumerate() {
            let at = format!("spec.keys[{i}].subpaths[{j}]");
            if !sub.path.starts_with('/') {
                errors.push(format!("{at}.path {:?} must start with '/'", sub.path));
            }
            if let Err(e) = regex::Regex::new(&format!("^{}", sub.path)) {
                errors.push(format!(
                    "{at}.path {:?} is not a valid regular expression: {e}",
                    sub.path
                ));
            }
            check_rule(&sub.rule, &format!("{at}.rule"), &mut errors);
        }
        if let Some(rate) = &key.rate
            && rate.amount < 1
        {
            errors.push(format!("spec.keys[{i}].rate.amount must be at least 1"));
        }
    }
    errors
}

fn check_rule(rule: &Rule, at: &str, errors: &mut Vec<String>) {
    match (&rule.global, &rule.granular) {
        (Some(_), Some(_)) => {
            errors.push(format!("{at} must set either global or granular, not both"))
        }
        (None, None) => errors.push(format!("{at} must set global or granular")),
        (None, Some(g)) => {
            for verb in &g.verbs {
                if http::Method::from_bytes(verb.to_ascii_uppercase().as_bytes()).is_err() {
                    errors.push(format!(
                        "{at}.granular.verbs: {verb:?} is not an HTTP method"
                    ));
                }
            }
        }
        (Some(_), None) => {}
    }
}

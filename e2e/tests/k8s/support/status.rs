//! Status conditions, as `kubectl get -o json` shows them.

use serde_json::Value;

/// Condition `type_` of the object's status.
pub fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether the object's status is about its current generation (top-level and every condition).
pub fn check_current(obj: &Value) -> Result<i64, String> {
    let generation = obj["metadata"]["generation"]
        .as_i64()
        .ok_or("no metadata.generation")?;
    let status = &obj["status"];
    if status["observedGeneration"].as_i64() != Some(generation) {
        return Err(format!(
            "status.observedGeneration is {} but metadata.generation is {generation}; status: {status}",
            status["observedGeneration"]
        ));
    }
    for c in status["conditions"].as_array().into_iter().flatten() {
        if c["observedGeneration"].as_i64() != Some(generation) {
            return Err(format!(
                "condition {} has observedGeneration {} but metadata.generation is {generation}",
                c["type"], c["observedGeneration"]
            ));
        }
    }
    Ok(generation)
}

/// Whether condition `type_` has `status` (and `reason`, when given) at the current generation.
pub fn check_condition(
    obj: &Value,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> Result<(), String> {
    check_current(obj)?;
    let c = condition(obj, type_)
        .ok_or_else(|| format!("no {type_} condition; status: {}", obj["status"]))?;
    if c["status"] != status || reason.is_some_and(|r| c["reason"] != r) {
        return Err(format!(
            "wanted {type_}={status}{}, got {c}",
            reason.map(|r| format!(" reason {r}")).unwrap_or_default()
        ));
    }
    Ok(())
}

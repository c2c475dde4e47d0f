//! Holds the lighthouse's answers to its own OpenAPI document: each answer
//! must have every property its schema requires, of the types it gives,
//! and no property the document does not describe.

use serde_json::Value;

/// Checks `body`, the answer with `status` to `method` on `path` (as the
/// document names it, e.g. `/tokens/{id}`), against `doc`.
pub fn check(
    doc: &Value,
    path: &str,
    method: &str,
    status: u16,
    body: &Value,
) -> Result<(), String> {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    if op.is_null() {
        return Err(format!("the document has no {method} {path}"));
    }
    let answer = resolve(doc, &op["responses"][status.to_string()]);
    if answer.is_null() {
        return Err(format!("the document has no {status} for {method} {path}"));
    }
    let schema = &answer["content"]["application/json"]["schema"];
    matches(doc, schema, body, "$").map_err(|e| format!("{method} {path} {status}: {e}"))
}

/// Checks an error answer (to a path or method the document does not
/// have) against its `Error` schema.
pub fn check_error(doc: &Value, body: &Value) -> Result<(), String> {
    matches(doc, &doc["components"]["schemas"]["Error"], body, "$")
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str().and_then(|r| r.strip_prefix("#/")) {
        Some(r) => r.split('/').fold(doc, |at, key| &at[key]),
        None => v,
    }
}

fn matches(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if v.is_null() && schema["nullable"] == true {
        return Ok(());
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            return Err(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    let ok = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_u64() || v.is_i64(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: {v} is not of type {}", schema["type"]));
    }
    if let (Some(obj), Some(props)) = (v.as_object(), schema["properties"].as_object()) {
        for r in schema["required"].as_array().into_iter().flatten() {
            let key = r.as_str().unwrap_or_default();
            if !obj.contains_key(key) {
                return Err(format!("{at}: required property {key:?} missing"));
            }
        }
        for (key, value) in obj {
            let Some(p) = props.get(key) else {
                return Err(format!("{at}: property {key:?} is not in the document"));
            };
            matches(doc, p, value, &format!("{at}.{key}"))?;
        }
    }
    if let (Some(obj), Some(values)) = (v.as_object(), schema["additionalProperties"].as_object()) {
        // A map: any keys, each value of the schema given.
        let values = Value::Object(values.clone());
        for (key, value) in obj {
            matches(doc, &values, value, &format!("{at}.{key}"))?;
        }
    }
    if let Some(items) = v.as_array() {
        for (i, item) in items.iter().enumerate() {
            matches(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_it_catches() {
        let doc = json!({
            "paths": {"/x": {"get": {"responses": {"200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/X"}}}}}}}},
            "components": {"schemas": {"X": {"type": "object", "required": ["a"], "properties": {
                "a": {"type": "integer"}, "b": {"type": "string", "nullable": true}, "c": {"type": "array", "items": {"type": "string", "enum": ["u", "v"]}}}}}}
        });
        assert!(check(
            &doc,
            "/x",
            "GET",
            200,
            &json!({"a": 1, "b": null, "c": ["u"]})
        )
        .is_ok());
        for (bad, says) in [
            (json!({"b": "x"}), "required"),
            (json!({"a": "1"}), "type"),
            (json!({"a": 1, "z": 2}), "not in the document"),
            (json!({"a": 1, "c": ["w"]}), "one of"),
        ] {
            let e = check(&doc, "/x", "GET", 200, &bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        assert!(check(&doc, "/y", "GET", 200, &json!({})).is_err());
        assert!(check(&doc, "/x", "GET", 404, &json!({})).is_err());
    }
}

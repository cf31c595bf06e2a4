//! Block node options as qemu-storage-daemon's `--blockdev` and QMP's `blockdev-add`
//! take them: QEMU's dotted `key=value` syntax or JSON, checked with QEMU's error texts.

use serde_json::{Map, Value};

/// Why options were refused. `Display` is QEMU's text for the same mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// A key the driver does not take.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// A required key is absent.
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// An enumeration value that is not one of the choices.
    #[error("Parameter '{key}' does not accept value '{value}'")]
    BadValue {
        /// The key.
        key: String,
        /// The rejected value.
        value: String,
    },
    /// A boolean given as a string that is not `on` or `off`.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsOnOff(String),
    /// A number given as a string that is not one.
    #[error("Parameter '{key}' expects {what}")]
    Expects {
        /// The key.
        key: String,
        /// What was expected, in QEMU's words (e.g. `uint64`).
        what: String,
    },
    /// A JSON value of the wrong type.
    #[error("Invalid parameter type for '{key}', expected: {expected}")]
    InvalidType {
        /// The key.
        key: String,
        /// The expected JSON type, in QEMU's words (`boolean`, `string`, `integer`, `object`).
        expected: String,
    },
    /// A node name that is not an identifier.
    #[error("Invalid node-name: '{0}'")]
    InvalidNodeName(String),
    /// A key=value string that cannot be parsed.
    #[error("{0}")]
    Syntax(String),
    /// Options that contradict each other.
    #[error("{0}")]
    Conflict(String),
}

/// Parses QEMU's dotted key=value syntax (`driver=qcow2,file.driver=file,bitmaps.0=b`)
/// into a JSON tree whose leaves are strings; `,,` stands for a comma in a value. A
/// string starting with `{` is parsed as JSON instead (as `--blockdev` allows).
pub fn parse_keyval_or_json(text: &str) -> Result<(Value, Syntax), OptionsError> {
    if text.trim_start().starts_with('{') {
        let value: Value =
            serde_json::from_str(text).map_err(|e| OptionsError::Syntax(format!("{e}")))?;
        return Ok((value, Syntax::Json));
    }
    Ok((parse_keyval(text)?, Syntax::Keyval))
}

/// Where options came from: key=value strings carry every scalar as a string; JSON has
/// real types, which must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// QEMU's `key=value` syntax.
    Keyval,
    /// JSON (QMP, or `--blockdev {...}`).
    Json,
}

fn parse_keyval(text: &str) -> Result<Value, OptionsError> {
    let mut root = Map::new();
    let mut rest = text;
    while !rest.is_empty() {
        let eq = rest.find(['=', ',']);
        let key = &rest[..eq.unwrap_or(rest.len())];
        if eq.is_none_or(|i| rest.as_bytes()[i] != b'=') {
            return Err(OptionsError::Syntax(format!("Expected '=' after parameter '{key}'")));
        }
        rest = &rest[eq.unwrap_or(0) + 1..];
        let mut value = String::new();
        loop {
            match rest.find(',') {
                Some(i) if rest[i + 1..].starts_with(',') => {
                    value.push_str(&rest[..=i]);
                    rest = &rest[i + 2..];
                }
                Some(i) => {
                    value.push_str(&rest[..i]);
                    rest = &rest[i + 1..];
                    break;
                }
                None => {
                    value.push_str(rest);
                    rest = "";
                    break;
                }
            }
        }
        insert_dotted(&mut root, key, value)?;
    }
    Ok(lists_from_numeric_keys(Value::Object(root)))
}

fn insert_dotted(
    root: &mut Map<String, Value>,
    key: &str,
    value: String,
) -> Result<(), OptionsError> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(OptionsError::Syntax(format!("Invalid parameter '{key}'")));
    }
    let mut map = root;
    for (i, part) in parts.iter().enumerate() {
        let prefix = parts[..=i].join(".");
        if i + 1 == parts.len() {
            if map.contains_key(*part) {
                return Err(OptionsError::Syntax(format!("Parameter '{prefix}' appears twice")));
            }
            map.insert(part.to_string(), Value::String(value));
            return Ok(());
        }
        let entry = map.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(inner) => inner,
            _ => {
                return Err(OptionsError::Syntax(format!(
                    "Parameter '{prefix}' used inconsistently"
                )));
            }
        };
    }
    Ok(())
}

/// Objects whose keys are exactly 0..n become lists (`bitmaps.0=a,bitmaps.1=b`).
fn lists_from_numeric_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let numeric =
                !map.is_empty() && (0..map.len()).all(|i| map.contains_key(&i.to_string()));
            let mut map: Map<String, Value> =
                map.into_iter().map(|(k, v)| (k, lists_from_numeric_keys(v))).collect();
            if numeric {
                Value::Array(
                    (0..map.len())
                        .map(|i| map.remove(&i.to_string()).unwrap_or_default())
                        .collect(),
                )
            } else {
                Value::Object(map)
            }
        }
        other => other,
    }
}

/// Typed access to one level of an options object, which tracks the keys used so that
/// leftovers are reported as unexpected (with their dotted path).
#[derive(Debug)]
pub struct OptionsReader {
    map: Map<String, Value>,
    prefix: String,
    syntax: Syntax,
}

impl OptionsReader {
    /// Reads `value`, which must be an object; `prefix` is the dotted path to it (empty
    /// at the top).
    pub fn new(value: Value, prefix: &str, syntax: Syntax) -> Result<Self, OptionsError> {
        match value {
            Value::Object(map) => Ok(OptionsReader { map, prefix: prefix.to_string(), syntax }),
            _ => Err(OptionsError::InvalidType {
                key: prefix.to_string(),
                expected: "object".into(),
            }),
        }
    }

    /// The dotted path of `key` at this level.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_string() } else { format!("{}.{key}", self.prefix) }
    }

    /// The syntax the options came in.
    pub fn syntax(&self) -> Syntax {
        self.syntax
    }

    /// Takes a raw value (for nested objects and references).
    pub fn take_value(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// Takes an optional string.
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>, OptionsError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => {
                Err(OptionsError::InvalidType { key: self.path(key), expected: "string".into() })
            }
        }
    }

    /// Takes a required string.
    pub fn require_str(&mut self, key: &str) -> Result<String, OptionsError> {
        self.take_str(key)?.ok_or_else(|| OptionsError::Missing(self.path(key)))
    }

    /// Takes an optional boolean (in key=value syntax `on`/`off`, and like QEMU also
    /// `yes`/`no`, `true`/`false` and `y`/`n`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, OptionsError> {
        match (self.map.remove(key), self.syntax) {
            (None, _) => Ok(None),
            (Some(Value::Bool(b)), Syntax::Json) => Ok(Some(b)),
            (Some(Value::String(s)), Syntax::Keyval) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(OptionsError::ExpectsOnOff(self.path(key))),
            },
            _ => Err(OptionsError::InvalidType { key: self.path(key), expected: "boolean".into() }),
        }
    }

    /// Takes an optional unsigned integer.
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, OptionsError> {
        match (self.map.remove(key), self.syntax) {
            (None, _) => Ok(None),
            (Some(Value::Number(n)), Syntax::Json) => n.as_u64().map(Some).ok_or_else(|| {
                OptionsError::InvalidType { key: self.path(key), expected: "uint64".into() }
            }),
            (Some(Value::String(s)), Syntax::Keyval) => s.parse().map(Some).map_err(|_| {
                OptionsError::Expects { key: self.path(key), what: "an integer".into() }
            }),
            _ => Err(OptionsError::InvalidType { key: self.path(key), expected: "integer".into() }),
        }
    }

    /// Takes an optional enumeration value among `choices`.
    pub fn take_enum(
        &mut self,
        key: &str,
        choices: &[&str],
    ) -> Result<Option<String>, OptionsError> {
        let Some(value) = self.take_str(key)? else { return Ok(None) };
        if choices.contains(&value.as_str()) {
            Ok(Some(value))
        } else {
            // QEMU's enum visitor names the member alone, without its path
            // (`file.locking=bogus` -> `Parameter 'locking' …`).
            Err(OptionsError::BadValue { key: key.to_string(), value })
        }
    }

    /// Fails on the first key that nothing took.
    pub fn finish(self) -> Result<(), OptionsError> {
        match self.map.keys().next() {
            Some(key) => Err(OptionsError::Unexpected(self.path(key))),
            None => Ok(()),
        }
    }
}

/// Whether `name` is a valid node name: a letter, then letters, digits, `-`, `.` and
/// `_`, at most 31 characters.
pub fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() < 32
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_builds_nested_objects_lists_and_escapes_commas() {
        let (v, syntax) = parse_keyval_or_json(
            "driver=qcow2,node-name=d,file.driver=file,file.filename=/a,,b,bitmaps.0=x,bitmaps.1=y",
        )
        .unwrap();
        assert_eq!(syntax, Syntax::Keyval);
        assert_eq!(
            v,
            json!({"driver": "qcow2", "node-name": "d",
                   "file": {"driver": "file", "filename": "/a,b"}, "bitmaps": ["x", "y"]})
        );
    }

    #[test]
    fn keyval_errors_use_qemus_texts() {
        assert_eq!(
            parse_keyval_or_json("driver").unwrap_err().to_string(),
            "Expected '=' after parameter 'driver'"
        );
        assert_eq!(
            parse_keyval_or_json("a=1,a=2").unwrap_err().to_string(),
            "Parameter 'a' appears twice"
        );
        let (v, s) = parse_keyval_or_json("read-only=maybe,x=1,n=12").unwrap();
        let mut r = OptionsReader::new(v, "", s).unwrap();
        assert_eq!(r.take_u64("n").unwrap(), Some(12));
        assert_eq!(
            r.take_bool("read-only").unwrap_err().to_string(),
            "Parameter 'read-only' expects 'on' or 'off'"
        );
        assert_eq!(r.finish().unwrap_err().to_string(), "Parameter 'x' is unexpected");
        let (v, s) = parse_keyval_or_json(r#"{"read-only": "on"}"#).unwrap();
        let mut r = OptionsReader::new(v, "file", s).unwrap();
        assert_eq!(
            r.take_bool("read-only").unwrap_err().to_string(),
            "Invalid parameter type for 'file.read-only', expected: boolean"
        );
    }

    #[test]
    fn node_names_follow_qemus_rules() {
        for good in ["a", "disk0", "a-b.c_d", &"x".repeat(31)] {
            assert!(valid_node_name(good), "{good}");
        }
        for bad in ["", "9a", "-a", "a b", "#block1", &"x".repeat(32)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}

//! The QMP wire protocol as QEMU speaks it: the greeting, commands as JSON objects,
//! `{"return": …}` and `{"error": {"class", "desc"}}` replies (with the `id` echoed),
//! events with timestamps, each message followed by CRLF.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

/// QEMU's error classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// An unknown command, or a command in the wrong mode.
    CommandNotFound,
    /// A device has no medium or is not active.
    DeviceNotActive,
    /// A device was not found (rarely used by QEMU today).
    DeviceNotFound,
}

impl ErrorClass {
    /// The class as QEMU spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// A command's failure: a class and QEMU's text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// The description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::GenericError, desc: desc.into() }
    }

    /// A `CommandNotFound` with `desc`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::CommandNotFound, desc: desc.into() }
    }
}

/// A command as received.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// The command's name.
    pub name: String,
    /// Its arguments (an empty object when absent).
    pub arguments: Map<String, Value>,
    /// The `id` to echo.
    pub id: Option<Value>,
}

/// Checks a parsed message's shape, with QEMU's texts. An error comes with the `id` to
/// echo, when the message had a usable one.
pub fn parse_command(message: Value) -> Result<Command, (QmpError, Option<Value>)> {
    let Value::Object(mut map) = message else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = map.remove("id");
    let fail = |desc: String, id: &Option<Value>| Err((QmpError::generic(desc), id.clone()));
    let name = match map.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
        None => match map.keys().next() {
            Some(key) => return fail(format!("QMP input member '{key}' is unexpected"), &id),
            None => return fail("QMP input lacks member 'execute'".into(), &id),
        },
    };
    let arguments = match map.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    if let Some(key) = map.keys().next() {
        return fail(format!("QMP input member '{key}' is unexpected"), &id);
    }
    Ok(Command { name, arguments, id })
}

/// The greeting sent when a client connects.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": ["oob"]}})
}

/// What `query-version` answers: the QEMU version whose interfaces blockdelta speaks, and
/// blockdelta's own name and version as the package.
pub fn version() -> Value {
    json!({
        "qemu": {"micro": 2, "minor": 0, "major": 10},
        "package": concat!("blockdelta ", env!("CARGO_PKG_VERSION")),
    })
}

/// A success reply.
pub fn return_reply(value: Value, id: Option<Value>) -> Value {
    let mut map = Map::new();
    map.insert("return".into(), value);
    if let Some(id) = id {
        map.insert("id".into(), id);
    }
    Value::Object(map)
}

/// An error reply.
pub fn error_reply(error: &QmpError, id: Option<Value>) -> Value {
    let mut map = Map::new();
    map.insert("error".into(), json!({"class": error.class.as_str(), "desc": error.desc}));
    if let Some(id) = id {
        map.insert("id".into(), id);
    }
    Value::Object(map)
}

/// An event with the current time.
pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut map = Map::new();
    map.insert("event".into(), Value::String(name.into()));
    if let Some(data) = data {
        map.insert("data".into(), data);
    }
    map.insert(
        "timestamp".into(),
        json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}),
    );
    Value::Object(map)
}

/// A message as sent on the wire: JSON (with QEMU's `", "` and `": "` spacing) and CRLF.
pub fn encode(message: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, message);
    out.extend_from_slice(b"\r\n");
    out
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.extend_from_slice(b": ");
                write_value(out, v);
            }
            out.push(b'}');
        }
        Value::Array(list) => {
            out.push(b'[');
            for (i, v) in list.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_value(out, v);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts qemu-storage-daemon 10.0.2 answers for the same malformed messages.
    #[test]
    fn malformed_messages_get_qemus_errors() {
        for (text, desc) in [
            ("[1]", "QMP input must be a JSON object"),
            (r#"{"exec":"x"}"#, "QMP input member 'exec' is unexpected"),
            (r#"{"execute":1}"#, "QMP input member 'execute' must be a string"),
            (
                r#"{"execute":"query-version","arguments":[]}"#,
                "QMP input member 'arguments' must be an object",
            ),
            (r#"{"execute":"query-version","foo":1}"#, "QMP input member 'foo' is unexpected"),
            ("{}", "QMP input lacks member 'execute'"),
        ] {
            let (e, _) = parse_command(serde_json::from_str(text).unwrap()).unwrap_err();
            assert_eq!(e, QmpError::generic(desc), "{text}");
        }
        let c = parse_command(json!({"execute": "quit", "id": 7})).unwrap();
        assert_eq!((c.name.as_str(), c.id), ("quit", Some(json!(7))));
    }

    #[test]
    fn replies_are_spaced_like_qemus_and_end_in_crlf() {
        let r = return_reply(json!([1, {"a": null}]), None);
        assert_eq!(encode(&r), b"{\"return\": [1, {\"a\": null}]}\r\n");
        let r = return_reply(json!({}), Some(json!("x")));
        assert_eq!(
            serde_json::from_slice::<Value>(&encode(&r)).unwrap(),
            json!({"return": {}, "id": "x"})
        );
        let e = error_reply(&QmpError::command_not_found("x"), None);
        assert_eq!(
            encode(&e),
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"x\"}}\r\n"
        );
    }
}

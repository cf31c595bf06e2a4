//! The options of `--nbd-server` / `nbd-server-start` and `--export` / `block-export-add`,
//! read with QEMU's spellings, defaults and error texts.

use std::path::PathBuf;

use serde_json::Value;

use crate::block::options::{OptionsError, OptionsReader, Syntax};

/// QEMU's default `max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100;

/// Where an NBD server listens (QEMU's `SocketAddress`, the kinds blockdelta serves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// A unix socket at this path (created owner-only).
    Unix(PathBuf),
    /// A TCP address; only this address is bound.
    Inet {
        /// Host name or address.
        host: String,
        /// Port number or service name.
        port: String,
    },
}

/// `--nbd-server` / `nbd-server-start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdServerOptions {
    /// Where to listen.
    pub addr: ListenAddress,
    /// Connections served at once; 0 = unlimited. With 1, multi-connection support is not
    /// advertised.
    pub max_connections: u32,
}

impl NbdServerOptions {
    /// Reads the options (`addr.type=unix,addr.path=…` or `addr.type=inet,addr.host=…,
    /// addr.port=…`, and `max-connections`).
    pub fn from_value(value: Value, syntax: Syntax) -> Result<Self, OptionsError> {
        let mut r = OptionsReader::new(value, "", syntax)?;
        let addr = r.take_value("addr").ok_or_else(|| OptionsError::Missing("addr".into()))?;
        let max_connections = match r.take_u64("max-connections") {
            Ok(v) => v.unwrap_or(u64::from(DEFAULT_MAX_CONNECTIONS)),
            Err(OptionsError::Expects { key, .. }) => {
                return Err(OptionsError::Expects { key, what: "integer".into() });
            }
            Err(e) => return Err(e),
        };
        let max_connections = u32::try_from(max_connections).map_err(|_| {
            OptionsError::Conflict(format!(
                "Parameter 'max-connections' expects uint32_t, got {max_connections}"
            ))
        })?;
        // Accepted and ignored: handshakes are bounded by the codec's limits instead.
        r.take_u64("handshake-max-seconds")?;
        if let Some(tls) = r.take_str("tls-creds")? {
            return Err(OptionsError::Conflict(format!(
                "No TLS credentials with id '{tls}': blockdelta serves NBD without TLS; \
                 use a unix socket or 127.0.0.1"
            )));
        }
        r.finish()?;
        let mut a = OptionsReader::new(addr, "addr", syntax)?;
        let kind = a.take_str("type")?.ok_or_else(|| OptionsError::Missing("addr.type".into()))?;
        let addr = match kind.as_str() {
            "unix" => {
                let path = a.require_str("path")?;
                ListenAddress::Unix(PathBuf::from(path))
            }
            "inet" => {
                let host = a.require_str("host")?;
                let port = a.require_str("port")?;
                ListenAddress::Inet { host, port }
            }
            _ => {
                return Err(OptionsError::BadValue { key: "addr.type".into(), value: kind });
            }
        };
        a.finish()?;
        Ok(NbdServerOptions { addr, max_connections })
    }
}

/// A bitmap to export: a name looked up from the export's node down its backing chain,
/// or a bitmap on a named node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportBitmap {
    /// `bitmaps.N=NAME`.
    Local(String),
    /// `bitmaps.N.node=NODE,bitmaps.N.name=NAME`.
    On {
        /// The node holding the bitmap.
        node: String,
        /// The bitmap's name.
        name: String,
    },
}

impl ExportBitmap {
    /// The bitmap's name (which names the `qemu:dirty-bitmap:` context).
    pub fn name(&self) -> &str {
        match self {
            ExportBitmap::Local(name) | ExportBitmap::On { name, .. } => name,
        }
    }
}

/// `--export type=nbd,…` / `block-export-add`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockExportOptions {
    /// The export's id.
    pub id: String,
    /// The node to export.
    pub node_name: String,
    /// Whether clients may write.
    pub writable: bool,
    /// Flush after every write before completing it.
    pub writethrough: bool,
    /// The NBD export name (the node name when not given).
    pub name: String,
    /// Free-form description.
    pub description: Option<String>,
    /// Bitmaps exported as `qemu:dirty-bitmap:NAME` contexts, in order.
    pub bitmaps: Vec<ExportBitmap>,
    /// Export `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// `iothread`, which blockdelta does not have (refused as QEMU refuses an unknown
    /// one).
    pub iothread: Option<String>,
}

impl BlockExportOptions {
    /// Reads the options of an NBD export.
    pub fn from_value(value: Value, syntax: Syntax) -> Result<Self, OptionsError> {
        let mut r = OptionsReader::new(value, "", syntax)?;
        let kind = r.take_str("type")?.ok_or_else(|| OptionsError::Missing("type".into()))?;
        if kind != "nbd" {
            return Err(OptionsError::BadValue { key: "type".into(), value: kind });
        }
        let id = r.require_str("id")?;
        let node_name = r.require_str("node-name")?;
        let writable = r.take_bool("writable")?.unwrap_or(false);
        let writethrough = r.take_bool("writethrough")?.unwrap_or(false);
        let iothread = r.take_str("iothread")?;
        r.take_bool("fixed-iothread")?;
        r.take_bool("allow-inactive")?;
        let name = r.take_str("name")?.unwrap_or_else(|| node_name.clone());
        let description = r.take_str("description")?;
        let allocation_depth = r.take_bool("allocation-depth")?.unwrap_or(false);
        let bitmaps = match r.take_value("bitmaps") {
            None => Vec::new(),
            Some(v) => read_bitmaps(v, syntax)?,
        };
        r.finish()?;
        Ok(BlockExportOptions {
            id,
            node_name,
            writable,
            writethrough,
            name,
            description,
            bitmaps,
            allocation_depth,
            iothread,
        })
    }
}

fn read_bitmaps(value: Value, syntax: Syntax) -> Result<Vec<ExportBitmap>, OptionsError> {
    let list = match value {
        Value::Array(list) => list,
        // key=value lists whose indexes do not run 0..n stay objects.
        Value::Object(map) if syntax == Syntax::Keyval => {
            let missing = (0..=map.len()).find(|i| !map.contains_key(&i.to_string()));
            return Err(OptionsError::Conflict(format!(
                "Parameter 'bitmaps.{}' missing",
                missing.unwrap_or(0)
            )));
        }
        _ => {
            return Err(OptionsError::InvalidType {
                key: "bitmaps".into(),
                expected: "array".into(),
            });
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.into_iter().enumerate() {
        let path = format!("bitmaps.{i}");
        match item {
            Value::String(name) => out.push(ExportBitmap::Local(name)),
            Value::Object(_) => {
                let mut b = OptionsReader::new(item, &path, syntax)?;
                let node = b.require_str("node")?;
                let name = b.require_str("name")?;
                b.finish()?;
                out.push(ExportBitmap::On { node, name });
            }
            _ => {
                return Err(OptionsError::InvalidType {
                    key: path,
                    expected: "BlockDirtyBitmapOrStr".into(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::options::parse_keyval_or_json;

    fn export(text: &str) -> Result<BlockExportOptions, String> {
        let (v, s) = parse_keyval_or_json(text).map_err(|e| e.to_string())?;
        BlockExportOptions::from_value(v, s).map_err(|e| e.to_string())
    }

    fn server(text: &str) -> Result<NbdServerOptions, String> {
        let (v, s) = parse_keyval_or_json(text).map_err(|e| e.to_string())?;
        NbdServerOptions::from_value(v, s).map_err(|e| e.to_string())
    }

    #[test]
    fn export_options_take_qemus_keys_and_defaults() {
        let e = export("type=nbd,id=e0,node-name=disk0,bitmaps.0=b0,bitmaps.1.node=n,bitmaps.1.name=b1,allocation-depth=on,writable=on")
            .unwrap();
        assert_eq!(e.name, "disk0");
        assert!(e.writable && e.allocation_depth && !e.writethrough);
        assert_eq!(
            e.bitmaps,
            vec![
                ExportBitmap::Local("b0".into()),
                ExportBitmap::On { node: "n".into(), name: "b1".into() }
            ]
        );
        let j = export(r#"{"type":"nbd","id":"e","node-name":"d","name":"x","bitmaps":["a",{"node":"d","name":"b"}]}"#).unwrap();
        assert_eq!(j.name, "x");
        assert_eq!(j.bitmaps.len(), 2);
    }

    /// Texts taken from qemu-storage-daemon 10.0.2 given the same `--export` strings.
    #[test]
    fn export_option_errors_are_qemus() {
        for (text, error) in [
            ("type=nbd,node-name=disk0", "Parameter 'id' is missing"),
            ("type=nbd,id=e0", "Parameter 'node-name' is missing"),
            ("type=xx,id=e0,node-name=disk0", "Parameter 'type' does not accept value 'xx'"),
            ("id=e0,node-name=disk0", "Parameter 'type' is missing"),
            (
                "type=nbd,id=e0,node-name=disk0,writable=maybe",
                "Parameter 'writable' expects 'on' or 'off'",
            ),
            ("type=nbd,id=e0,node-name=disk0,bitmaps.1=b1", "Parameter 'bitmaps.0' missing"),
            (
                "type=nbd,id=e0,node-name=disk0,bitmaps.0.node=disk0",
                "Parameter 'bitmaps.0.name' is missing",
            ),
            ("type=nbd,id=e0,node-name=disk0,foo=1", "Parameter 'foo' is unexpected"),
            ("type=nbd,id=e0,node-name=disk0,bitmap=b0", "Parameter 'bitmap' is unexpected"),
        ] {
            assert_eq!(export(text).unwrap_err(), error, "{text}");
        }
    }

    #[test]
    fn nbd_server_options_and_errors_are_qemus() {
        assert_eq!(
            server("addr.type=unix,addr.path=/tmp/s").unwrap(),
            NbdServerOptions {
                addr: ListenAddress::Unix("/tmp/s".into()),
                max_connections: DEFAULT_MAX_CONNECTIONS
            }
        );
        assert_eq!(
            server("addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=1").unwrap(),
            NbdServerOptions {
                addr: ListenAddress::Inet { host: "127.0.0.1".into(), port: "10809".into() },
                max_connections: 1
            }
        );
        for (text, error) in [
            ("addr.type=unix", "Parameter 'addr.path' is missing"),
            ("addr.type=inet,addr.host=127.0.0.1", "Parameter 'addr.port' is missing"),
            (
                "addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=x",
                "Parameter 'max-connections' expects integer",
            ),
            ("addr.path=x", "Parameter 'addr.type' is missing"),
            ("addr.type=unix,addr.path=/tmp/s,foo=bar", "Parameter 'foo' is unexpected"),
        ] {
            assert_eq!(server(text).unwrap_err(), error, "{text}");
        }
    }
}

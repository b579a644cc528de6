//! JSON and YAML of contract messages, made from the proto descriptors rather than by
//! hand: the JSON is byte for byte what grpcurl prints for the same call (camelCase
//! names, 64-bit integers as strings, enums by name, RFC 3339 timestamps, default values
//! left out, two-space indent), and a field added to the contract shows up without a
//! change here.

use std::io;
use std::sync::OnceLock;

use anyhow::Context;
use aviary_proto::v1 as pb;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter};

/// A message of the contract, by its full proto name.
pub(crate) trait Contract: prost::Message + Sized {
    /// `package.Message`.
    const NAME: &'static str;
}

macro_rules! contract {
    ($($t:ident),* $(,)?) => {
        $(impl Contract for pb::$t {
            const NAME: &'static str = concat!("aviary.v1.", stringify!($t));
        })*
    };
}

contract!(
    Node,
    ListNodesResponse,
    SetWeightResponse,
    RevokeNodeResponse,
    Release,
    ListReleasesResponse,
    Rollout,
    ListRolloutsResponse,
    Event,
    ListEventsResponse,
    ConfigLayer,
    ListConfigsResponse,
    NodeConfig,
    SetConfigResponse,
    ListEnrollmentsResponse,
    EnrollmentRequest,
    CreateEnrollTokenResponse,
    ListEnrollTokensResponse,
    EnrollToken,
    SetNodeLabelsResponse,
    ListRevocationsResponse,
    CaStatus,
);

fn pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(aviary_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("the built-in proto descriptors do not decode: {e}"))
}

fn dynamic<M: Contract>(msg: &M) -> anyhow::Result<DynamicMessage> {
    let desc = pool()?
        .get_message_by_name(M::NAME)
        .with_context(|| format!("{} is not in the descriptors", M::NAME))?;
    DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .with_context(|| format!("re-reading a {}", M::NAME))
}

fn options() -> SerializeOptions {
    // The proto3 JSON mapping as grpcurl applies it.
    SerializeOptions::new()
        .stringify_64_bit_integers(true)
        .use_enum_numbers(false)
        .use_proto_field_name(false)
        .skip_default_fields(true)
}

/// `msg` as grpcurl prints it (no trailing newline).
pub(crate) fn pretty<M: Contract>(msg: &M) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        Grpcurl(PrettyFormatter::with_indent(b"  ")),
    );
    dynamic(msg)?.serialize_with_options(&mut ser, &options())?;
    Ok(String::from_utf8(out)?)
}

/// `msg` on one line (a followed stream prints one per line).
pub(crate) fn line<M: Contract>(msg: &M) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Grpcurl(CompactFormatter));
    dynamic(msg)?.serialize_with_options(&mut ser, &options())?;
    Ok(String::from_utf8(out)?)
}

/// `msg` as YAML: the same document as the JSON, in YAML's block style.
pub(crate) fn yaml<M: Contract>(msg: &M) -> anyhow::Result<String> {
    let tree: Tree = serde_json::from_str(&line(msg)?)?;
    let mut out = String::new();
    tree.block(&mut out, 0);
    Ok(out)
}

/// serde_json's formatting, with floats as Go prints them: an integral value has no
/// `.0` (grpcurl prints a latency of 4 ms as `4`).
struct Grpcurl<F>(F);

impl<F: Formatter> Formatter for Grpcurl<F> {
    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        if value.fract() == 0.0 && value.abs() < 1e21 {
            // Exact: an integral f64 below 2^70 prints without a fraction.
            write!(w, "{value:.0}")
        } else {
            self.0.write_f64(w, value)
        }
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn end_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_key(w)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// A JSON document that keeps its keys in order (serde_json's `Value` sorts them).
#[derive(Debug)]
enum Tree {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Tree>),
    Object(Vec<(String, Tree)>),
}

impl<'de> serde::Deserialize<'de> for Tree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Tree, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Tree;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Tree, E> {
                Ok(Tree::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Tree, E> {
                Ok(Tree::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Tree, E> {
                Ok(Tree::Number(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Tree, E> {
                serde_json::Number::from_f64(v)
                    .map(Tree::Number)
                    .ok_or_else(|| E::custom("a non-finite number"))
            }
            fn visit_str<E>(self, v: &str) -> Result<Tree, E> {
                Ok(Tree::String(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Tree, E> {
                Ok(Tree::String(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = a.next_element()? {
                    items.push(item);
                }
                Ok(Tree::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = a.next_entry()? {
                    entries.push(entry);
                }
                Ok(Tree::Object(entries))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Tree {
    /// Appends this value as the body of a block at `indent` (after `key:` or `- `).
    fn block(&self, out: &mut String, indent: usize) {
        let pad = "  ".repeat(indent);
        match self {
            Tree::Object(entries) if !entries.is_empty() => {
                for (key, value) in entries {
                    out.push_str(&pad);
                    out.push_str(&scalar_string(key));
                    out.push(':');
                    value.after_key(out, indent);
                }
            }
            Tree::Array(items) if !items.is_empty() => {
                for item in items {
                    out.push_str(&pad);
                    out.push('-');
                    match item {
                        Tree::Object(e) if !e.is_empty() => {
                            // The first key on the dash's line, the rest under it.
                            let mut inner = String::new();
                            item.block(&mut inner, indent + 1);
                            out.push(' ');
                            out.push_str(inner.trim_start());
                        }
                        _ => item.after_key(out, indent),
                    }
                }
            }
            other => {
                out.push_str(&pad);
                out.push_str(&other.inline());
                out.push('\n');
            }
        }
    }

    /// Appends what follows `key:` (or `-`): a scalar on the line, or a nested block.
    fn after_key(&self, out: &mut String, indent: usize) {
        match self {
            Tree::Object(e) if !e.is_empty() => {
                out.push('\n');
                self.block(out, indent + 1);
            }
            Tree::Array(i) if !i.is_empty() => {
                out.push('\n');
                self.block(out, indent + 1);
            }
            _ => {
                out.push(' ');
                out.push_str(&self.inline());
                out.push('\n');
            }
        }
    }

    fn inline(&self) -> String {
        match self {
            Tree::Null => "null".into(),
            Tree::Bool(b) => b.to_string(),
            Tree::Number(n) => n.to_string(),
            Tree::String(s) => scalar_string(s),
            Tree::Array(_) => "[]".into(),
            Tree::Object(_) => "{}".into(),
        }
    }
}

/// A string as a YAML scalar: plain when YAML reads it back as the same string,
/// double-quoted (JSON escapes are valid YAML) otherwise.
fn scalar_string(s: &str) -> String {
    let special = |c: char| ":#{}[],&*!|>'\"%@`\\".contains(c) || c.is_control();
    let plain = !s.is_empty()
        && !s.starts_with([' ', '-', '?', '~'])
        && !s.ends_with(' ')
        && !s.contains(special)
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
        )
        && !number_like(s);
    if plain {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

/// Whether a YAML reader might take `s` for a number or a date rather than a string
/// (`1e3`, `0x1f`, `1_000`, `.5`, `2026-12-01`); a version such as `1.2.0` is not.
fn number_like(s: &str) -> bool {
    let numeric = s
        .chars()
        .all(|c| c.is_ascii_hexdigit() || "_.+-xXoO".contains(c));
    let dots = s.matches('.').count();
    s.parse::<f64>().is_ok()
        || (numeric && s.starts_with(|c: char| c.is_ascii_digit() || ".+".contains(c)) && dots <= 1)
        || (s.len() >= 10 && s.as_bytes()[4] == b'-' && s[..4].parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> pb::Node {
        pb::Node {
            node_id: "gw-1".into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
            connected: true,
            desired_revision: 7,
            modules: vec![pb::ModuleStatus {
                name: "app".into(),
                version: "1.2.0".into(),
                state: pb::ModuleState::Running as i32,
                health: pb::Health::Healthy as i32,
                ..Default::default()
            }],
            module_rollouts: vec![pb::ModuleRollout {
                module: "app".into(),
                health: Some(pb::ModuleHealth {
                    latency_p50_ms: 4.0,
                    latency_p99_ms: 4.25,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            last_seen: Some(prost_types::Timestamp {
                seconds: 1_796_186_660,
                nanos: 666_000_000,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn json_follows_the_proto3_mapping_as_grpcurl_prints_it() {
        let text = pretty(&node()).expect("json");
        for want in [
            "{\n  \"nodeId\": \"gw-1\",\n  \"labels\": {\n    \"region\": \"eu\"\n  },",
            "\"state\": \"MODULE_STATE_RUNNING\"",
            "\"health\": \"HEALTH_HEALTHY\"",
            "\"desiredRevision\": \"7\"",
            "\"lastSeen\": \"2026-12-02T04:44:20.666Z\"",
            "\"latencyP50Ms\": 4,",
            "\"latencyP99Ms\": 4.25",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert!(
            !text.contains("ackedRevision"),
            "defaults are left out:\n{text}"
        );
        assert!(!line(&node()).expect("line").contains('\n'));
    }

    #[test]
    fn yaml_is_the_same_document() {
        let text = yaml(&node()).expect("yaml");
        for want in [
            "nodeId: gw-1\n",
            "labels:\n  region: eu\n",
            "modules:\n  - name: app\n    version: 1.2.0\n    state: MODULE_STATE_RUNNING\n",
            "desiredRevision: \"7\"\n",
            "lastSeen: \"2026-12-02T04:44:20.666Z\"\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert_eq!(scalar_string("true"), "\"true\"");
        assert_eq!(scalar_string("a: b"), "\"a: b\"");
        assert_eq!(scalar_string(""), "\"\"");
        assert_eq!(scalar_string("gw-1"), "gw-1");
        assert_eq!(scalar_string("1.2.0"), "1.2.0");
        for quoted in ["1e3", "0x1f", "1_000", ".5", "2026-12-01", "12"] {
            assert_eq!(scalar_string(quoted), format!("{quoted:?}"), "{quoted}");
        }
    }
}

//! Entry points for the fuzz targets (`tests/fuzz`) and their corpus replay (a test in
//! `aviary-tests`): raw bytes in, and a panic is the only failure. They reach what the
//! control plane keeps private: its store records and its checks of edge messages.

use aviary_proto::v1 as pb;
use prost::Message;

use crate::audit::Event;
use crate::layers::ConfigLayer;
use crate::node::{NodeRecord, NodeStatus, WeightRule};
use crate::release::ReleaseRecord;
use crate::rollout::Rollout;
use crate::store::{decode, encode};

/// A stored record of the type the first byte picks, from the JSON after it: whatever
/// decodes must encode, and read back as the same value (the store never writes what it
/// cannot read).
pub fn store_record(data: &[u8]) {
    let Some((kind, json)) = data.split_first() else {
        return;
    };
    match kind % 7 {
        0 => round_trip::<NodeRecord>(json),
        1 => round_trip::<NodeStatus>(json),
        2 => round_trip::<WeightRule>(json),
        3 => round_trip::<ReleaseRecord>(json),
        4 => round_trip::<Rollout>(json),
        5 => round_trip::<ConfigLayer>(json),
        _ => round_trip::<Event>(json),
    }
}

fn round_trip<T>(json: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = decode::<T>(b"fuzz", json) else {
        return;
    };
    let bytes = match encode("fuzz", &value) {
        Ok(bytes) => bytes,
        // SystemTime before 1970 cannot be written: refused at the write, never stored.
        Err(_) => return,
    };
    let back: Option<T> = decode(b"fuzz", &bytes).ok();
    assert_eq!(
        back.as_ref(),
        Some(&value),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
}

/// An `EdgeMessage` as the fleet stream decodes it, then the control plane's checks of a
/// Hello and a health report.
pub fn edge_message(data: &[u8]) {
    let Ok(msg) = pb::EdgeMessage::decode(data) else {
        return;
    };
    match msg.kind {
        Some(pb::edge_message::Kind::Hello(hello)) => {
            let _ = crate::registry::HelloInfo::try_from(hello);
        }
        Some(pb::edge_message::Kind::Health(report)) => {
            if let Ok(records) = crate::fleet::check_health(report) {
                // What passed must be storable.
                let mut status = NodeStatus::default();
                for (module, h) in records {
                    status.modules.entry(module).or_default().health = Some(h);
                }
                assert!(encode("fuzz", &status).is_ok());
            }
        }
        _ => {}
    }
}

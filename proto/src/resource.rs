//! The resources of the fleet protocol and their names on the wire (`Hello.applied`):
//! both ends name them through this type, never by spelling the strings.

use std::fmt;

/// One kind of desired state a node is sent and answers for, per module where it has one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// The node's weight map: `weights`.
    Weights,
    /// What one module should run: `module/NAME`.
    Module(String),
    /// One module's runtime config: `config/NAME`.
    Config(String),
}

const WEIGHTS: &str = "weights";
const MODULE: &str = "module/";
const CONFIG: &str = "config/";

impl Resource {
    /// Parses a wire name; `None` for one this version does not know.
    pub fn parse(name: &str) -> Option<Resource> {
        if name == WEIGHTS {
            return Some(Resource::Weights);
        }
        if let Some(m) = name.strip_prefix(MODULE) {
            return Some(Resource::Module(m.to_owned()));
        }
        name.strip_prefix(CONFIG)
            .map(|m| Resource::Config(m.to_owned()))
    }

    /// The module it is about, if any.
    pub fn module(&self) -> Option<&str> {
        match self {
            Resource::Weights => None,
            Resource::Module(m) | Resource::Config(m) => Some(m),
        }
    }
}

impl fmt::Display for Resource {
    /// The wire name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Weights => f.write_str(WEIGHTS),
            Resource::Module(m) => write!(f, "{MODULE}{m}"),
            Resource::Config(m) => write!(f, "{CONFIG}{m}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_none() {
        for r in [
            Resource::Weights,
            Resource::Module("gateway".into()),
            Resource::Config("gateway".into()),
        ] {
            assert_eq!(Resource::parse(&r.to_string()), Some(r));
        }
        assert_eq!(Resource::Module("m".into()).to_string(), "module/m");
        assert_eq!(Resource::parse("secrets/m"), None);
        assert_eq!(Resource::Config("m".into()).module(), Some("m"));
    }
}

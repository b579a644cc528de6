//! The vocabulary of a run spec's sandbox fields, shared by the CLI that signs them and
//! the edge that applies them: socket address family names and memory sizes.

/// Address families every module may use: a module that may not talk over IP or to a
/// local socket could not be probed or report at all.
pub const BASE_ADDRESS_FAMILIES: &[(&str, i32)] =
    &[("AF_UNIX", 1), ("AF_INET", 2), ("AF_INET6", 10)];

/// Families a run spec may add, with Linux's numbers (`<linux/socket.h>`; the same on
/// every architecture). Gateway modules ask for these to reach buses and radios.
pub const EXTRA_ADDRESS_FAMILIES: &[(&str, i32)] = &[
    ("AF_NETLINK", 16),
    ("AF_PACKET", 17),
    ("AF_CAN", 29),
    ("AF_TIPC", 30),
    ("AF_BLUETOOTH", 31),
    ("AF_IEEE802154", 36),
    ("AF_ALG", 38),
    ("AF_NFC", 39),
    ("AF_VSOCK", 40),
    ("AF_QIPCRTR", 42),
    ("AF_XDP", 44),
    ("AF_MCTP", 45),
];

/// The number of address family `name` (`AF_CAN`), base or extra.
pub fn address_family(name: &str) -> Option<i32> {
    BASE_ADDRESS_FAMILIES
        .iter()
        .chain(EXTRA_ADDRESS_FAMILIES)
        .find(|(n, _)| *n == name)
        .map(|&(_, number)| number)
}

/// Smallest memory limit: below this not even a shell starts, and a limit that kills a
/// module before it runs is a typo, not a policy.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;

/// Parses a memory size the way systemd's `MemoryMax=` does: bytes, or a number with
/// `K`, `M`, `G` or `T` (powers of 1024). At least [`MIN_MEMORY_BYTES`].
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        Some(b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} is not a size: use bytes or a whole number with K, M, G or T"
        ));
    }
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < MIN_MEMORY_BYTES {
        return Err(format!(
            "{s:?} is below the smallest limit, {}M",
            MIN_MEMORY_BYTES >> 20
        ));
    }
    Ok(bytes)
}

/// Checks a path a run spec grants (a device or a writable path): absolute, not `/`,
/// without `.`, `..` or empty parts, and short enough for the kernel to take.
pub fn check_path(p: &str) -> Result<(), String> {
    // Every part named: no "", "." or ".." (Path::components would hide "/./").
    let normal = p.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    });
    if !normal || p.contains('\0') || p.len() > 4095 {
        return Err(format!(
            "{p:?} must be an absolute path other than / without . or .. parts"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_found_by_name_and_unknown_ones_are_not() {
        assert_eq!(address_family("AF_CAN"), Some(29));
        assert_eq!(address_family("AF_INET6"), Some(10));
        assert_eq!(address_family("AF_can"), None);
        assert_eq!(address_family("AF_KEY"), None);
    }

    #[test]
    fn memory_sizes_parse_like_systemds_and_nonsense_is_refused() {
        assert_eq!(parse_memory("64M"), Ok(64 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("8388608"), Ok(8 << 20));
        for bad in [
            "",
            "M",
            "1.5G",
            "-1G",
            "64MB",
            "64m",
            "1K",
            "NaN",
            "inf",
            " 64M",
            "99999999999T",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn granted_paths_must_be_absolute_and_plain() {
        assert!(check_path("/dev/ttyUSB0").is_ok());
        assert!(check_path("/var/lib/app").is_ok());
        for bad in [
            "dev/tty",
            "/",
            "/dev/../etc",
            "/var/./x",
            "/var//x",
            "/var/",
            "",
            "/a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}

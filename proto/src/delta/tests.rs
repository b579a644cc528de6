//! Round trips, refusals and the wire format of both payload versions.

use super::*;

/// What a lying payload says: its name, control, gaps and values streams.
type LyingCase = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>);

fn sample(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Compressible, structured, like code: runs and repeats.
            ((x >> 59) as u8).wrapping_add((i / 64) as u8)
        })
        .collect()
}

#[test]
fn a_delta_round_trips_and_is_smaller_than_the_full_payload() -> Result<(), DeltaError> {
    let old = sample(200_000, 1);
    let mut new = old.clone();
    new[1000..1100].copy_from_slice(&sample(100, 9));
    new.extend_from_slice(&sample(5000, 3));
    let delta = write_delta(&old, &new, 3, Vec::new())?;
    let full = write_full(new.as_slice(), 3, Vec::new())?;
    assert!(
        delta.len() * 4 < full.len(),
        "delta {} vs full {}",
        delta.len(),
        full.len()
    );
    let (header, out) = apply_delta(
        old.as_slice(),
        delta.as_slice(),
        &Sha256::of(&new),
        new.len() as u64,
        Vec::new(),
    )?;
    assert_eq!(out, new);
    assert_eq!(header.target, Sha256::of(&new));
    let back = apply_full(
        full.as_slice(),
        &Sha256::of(&new),
        new.len() as u64,
        Vec::new(),
    )?;
    assert_eq!(back, new);
    Ok(())
}

#[test]
fn a_delta_against_another_base_is_refused_before_patching() -> Result<(), DeltaError> {
    let old = sample(10_000, 1);
    let new = sample(10_000, 2);
    let delta = write_delta(&old, &new, 3, Vec::new())?;
    let other = sample(10_000, 3);
    assert!(matches!(
        apply_delta(
            other.as_slice(),
            delta.as_slice(),
            &Sha256::of(&new),
            new.len() as u64,
            Vec::new()
        ),
        Err(DeltaError::BaseMismatch { .. })
    ));
    Ok(())
}

#[test]
fn flipped_bits_truncation_and_bad_magic_are_errors_never_panics() -> Result<(), DeltaError> {
    let old = sample(50_000, 1);
    let mut new = old.clone();
    new[40_000..40_050].fill(7);
    let delta = write_delta(&old, &new, 3, Vec::new())?;
    let (signed, size) = (Sha256::of(&new), new.len() as u64);
    for i in (HEADER_LEN..delta.len()).step_by(7) {
        let mut bad = delta.clone();
        bad[i] ^= 0x40;
        // Some zstd frame-header bits (e.g. window size) do not change the output;
        // whatever is accepted must be exactly the signed result.
        if let Ok((_, out)) = apply_delta(old.as_slice(), bad.as_slice(), &signed, size, Vec::new())
        {
            assert_eq!(out, new, "bit flip at {i} produced other bytes");
        }
    }
    for cut in [0, 10, HEADER_LEN, HEADER_LEN + 5, delta.len() - 1] {
        assert!(
            apply_delta(old.as_slice(), &delta[..cut], &signed, size, Vec::new()).is_err(),
            "cut at {cut} accepted"
        );
    }
    let mut bad = delta.clone();
    bad[0] = b'X';
    assert!(matches!(
        apply_delta(old.as_slice(), bad.as_slice(), &signed, size, Vec::new()),
        Err(DeltaError::BadHeader)
    ));
    // A header that lies about the size is refused before anything is sized by it.
    for claim in [10u64, 1 << 40, u64::MAX] {
        let mut lying = delta.clone();
        lying[72..80].copy_from_slice(&claim.to_le_bytes());
        assert!(
            matches!(
                apply_delta(old.as_slice(), lying.as_slice(), &signed, size, Vec::new()),
                Err(DeltaError::HeaderMismatch { target_size, .. }) if target_size == claim
            ),
            "claim {claim}"
        );
    }
    Ok(())
}

/// A patch stream with the right header whose blocks produce more than the signed
/// size: refused at the first block past it, never buffered.
#[test]
fn a_patch_cannot_produce_more_than_the_signed_size() -> Result<(), DeltaError> {
    let old = sample(1000, 1);
    let new = sample(1000, 2);
    let (signed, size) = (Sha256::of(&new), new.len() as u64);
    let header = DeltaHeader {
        base: Sha256::of(&old),
        target: signed,
        target_size: size,
        version: 1,
    };
    for (mix, copy) in [
        (0u64, 1u64 << 40),
        (u64::MAX, 1),
        (1 << 62, 1 << 62),
        (0, 1001),
    ] {
        let mut patch = Vec::new();
        for w in [mix, copy, 0] {
            patch.extend_from_slice(&w.to_le_bytes());
        }
        patch.extend_from_slice(&[7u8; 2000]);
        let mut payload = header.encode().to_vec();
        payload.extend(zstd::encode_all(patch.as_slice(), 3)?);
        let err = apply_delta(
            old.as_slice(),
            payload.as_slice(),
            &signed,
            size,
            Vec::new(),
        );
        assert!(
            matches!(
                err,
                Err(DeltaError::TooLarge(_)) | Err(DeltaError::Corrupt(_))
            ),
            "({mix}, {copy}): {err:?}"
        );
    }
    // Empty blocks forever end at the stream bound, not in a hang.
    let endless = vec![0u8; 24 * 200_000];
    let mut payload = header.encode().to_vec();
    payload.extend(zstd::encode_all(endless.as_slice(), 3)?);
    let err = apply_delta(
        old.as_slice(),
        payload.as_slice(),
        &signed,
        size,
        Vec::new(),
    );
    assert!(matches!(err, Err(DeltaError::TooLarge(_))), "{err:?}");
    Ok(())
}

/// A zstd frame that asks for a 2 GiB window is refused instead of allocated.
#[test]
fn a_frame_asking_for_a_huge_window_is_refused() -> Result<(), DeltaError> {
    let data = sample(4096, 5);
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1)?;
    encoder.window_log(31)?;
    encoder.long_distance_matching(true)?;
    encoder.write_all(&data)?;
    let frame = encoder.finish()?;
    let err = apply_full(frame.as_slice(), &Sha256::of(&data), 4096, Vec::new());
    assert!(matches!(err, Err(DeltaError::Corrupt(_))), "{err:?}");
    assert!(max_payload_size(4096) < 4096 * 2 + (2 << 20));
    Ok(())
}

#[test]
fn a_full_payload_that_expands_past_its_size_is_refused() -> Result<(), DeltaError> {
    let data = vec![0u8; 1 << 20];
    let full = write_full(data.as_slice(), 3, Vec::new())?;
    let err = apply_full(full.as_slice(), &Sha256::of(&data), 1000, Vec::new());
    assert!(matches!(err, Err(DeltaError::TooLarge(1000))), "{err:?}");
    let err = apply_full(full.as_slice(), &Sha256::of(b"x"), 1 << 20, Vec::new());
    assert!(
        matches!(err, Err(DeltaError::ResultMismatch { .. })),
        "{err:?}"
    );
    Ok(())
}

/// An `AVDELTA1` payload as earlier versions made it: one zstd stream of blocks, each
/// 24 control bytes then its difference and literal bytes.
fn v1_payload(old: &[u8], new: &[u8]) -> Vec<u8> {
    struct V1(Vec<u8>);
    impl scan::Sink for V1 {
        fn block(&mut self, b: scan::Block, old: &[u8], new: &[u8], extra: &[u8]) {
            let seek = if b.seek < 0 {
                b.seek.unsigned_abs() | 1 << 63
            } else {
                b.seek as u64
            };
            for w in [b.add, b.copy, seek] {
                self.0.extend_from_slice(&w.to_le_bytes());
            }
            self.0
                .extend(old.iter().zip(new).map(|(o, n)| n.wrapping_sub(*o)));
            self.0.extend_from_slice(extra);
        }
    }
    let mut patch = V1(Vec::new());
    assert!(scan::diff(old, new, &mut patch));
    let header = DeltaHeader {
        base: Sha256::of(old),
        target: Sha256::of(new),
        target_size: new.len() as u64,
        version: 1,
    };
    let mut out = header.encode().to_vec();
    out.extend(zstd::encode_all(patch.0.as_slice(), 3).unwrap_or_default());
    out
}

/// Pairs of every shape: empty sides, unrelated bytes, moved and edited blocks.
fn pairs() -> Vec<(Vec<u8>, Vec<u8>)> {
    let base = sample(30_000, 4);
    let mut moved = base[15_000..].to_vec();
    moved.extend_from_slice(&base[..15_000]);
    let mut edited = base.clone();
    for i in (0..edited.len()).step_by(97) {
        edited[i] = edited[i].wrapping_add(3);
    }
    edited.splice(20_000..20_000, sample(700, 8));
    vec![
        (Vec::new(), Vec::new()),
        (Vec::new(), sample(1000, 1)),
        (sample(1000, 1), Vec::new()),
        (sample(5000, 2), sample(5000, 3)),
        (base.clone(), moved),
        (base.clone(), edited),
        (vec![0; 70_000], vec![0; 140_001]),
        (base.clone(), base),
    ]
}

#[test]
fn both_formats_round_trip_on_pairs_of_every_shape() -> Result<(), DeltaError> {
    for (old, new) in pairs() {
        let (sha, size) = (Sha256::of(&new), new.len() as u64);
        let v2 = write_delta(&old, &new, 3, Vec::new())?;
        let (h, out) = apply_delta(old.as_slice(), v2.as_slice(), &sha, size, Vec::new())?;
        assert_eq!(
            (h.version, out == new),
            (2, true),
            "v2 {} -> {}",
            old.len(),
            new.len()
        );
        let v1 = v1_payload(&old, &new);
        let (h, out) = apply_delta(old.as_slice(), v1.as_slice(), &sha, size, Vec::new())?;
        assert_eq!(
            (h.version, out == new),
            (1, true),
            "v1 {} -> {}",
            old.len(),
            new.len()
        );
    }
    Ok(())
}

/// Five streams whose lengths, counts or values lie: an error, never a panic, a
/// hang or output past the signed size.
#[test]
fn lying_streams_are_refused() -> Result<(), DeltaError> {
    let old = sample(20_000, 1);
    let mut new = old.clone();
    for i in (0..new.len()).step_by(50) {
        new[i] ^= 1;
    }
    let (signed, size) = (Sha256::of(&new), new.len() as u64);
    let good = write_delta(&old, &new, 3, Vec::new())?;
    let lengths = HEADER_LEN..HEADER_LEN + 8 * streams::STREAMS;
    for (field, value) in [(0usize, u64::MAX), (1, 1 << 40), (4, 0), (2, 3)] {
        let mut bad = good.clone();
        let at = lengths.start + field * 8;
        bad[at..at + 8].copy_from_slice(&value.to_le_bytes());
        let err = apply_delta(old.as_slice(), bad.as_slice(), &signed, size, Vec::new());
        assert!(err.is_err(), "length {field} = {value} accepted");
    }
    // Streams of our own making: a block past the size, a zero value, endless
    // empty blocks.
    let frame = |raw: &[u8], i: usize| streams::compress(raw, 3, streams::WINDOW_LOG[i]);
    let build = |control: &[u8], gaps: &[u8], values: &[u8]| -> io::Result<Vec<u8>> {
        let header = DeltaHeader {
            base: Sha256::of(&old),
            target: signed,
            target_size: size,
            version: 2,
        };
        let frames = [
            frame(control, 0)?,
            frame(gaps, 1)?,
            frame(&[], 2)?,
            frame(values, 3)?,
            frame(&[7u8; 100], 4)?,
        ];
        let mut out = header.encode().to_vec();
        for f in &frames {
            out.extend_from_slice(&(f.len() as u64).to_le_bytes());
        }
        for f in &frames {
            out.extend_from_slice(f);
        }
        Ok(out)
    };
    let cases: Vec<LyingCase> = vec![
        (
            "huge copy",
            vec![0, 0xff, 0xff, 0xff, 0xff, 0x0f, 0],
            vec![],
            vec![],
        ),
        (
            "past the base",
            vec![0xff, 0xff, 0x7f, 0, 0],
            vec![],
            vec![],
        ),
        ("zero value", vec![10, 0, 0], vec![0], vec![0]),
        ("values run out", vec![10, 0, 0], vec![0, 0], vec![5]),
        (
            "endless empty blocks",
            [0u8, 0, 0].repeat(2_000_000),
            vec![],
            vec![],
        ),
    ];
    for (what, control, gaps, values) in cases {
        let payload = build(&control, &gaps, &values)?;
        let err = apply_delta(
            old.as_slice(),
            payload.as_slice(),
            &signed,
            size,
            Vec::new(),
        );
        assert!(
            matches!(
                err,
                Err(DeltaError::TooLarge(_)) | Err(DeltaError::Corrupt(_))
            ),
            "{what}: {err:?}"
        );
    }
    Ok(())
}

/// A minimal ELF64 executable for `machine` whose `.text` is `code`.
fn elf(machine: u16, code: &[u8]) -> Vec<u8> {
    let names = b"\0.text\0.shstrtab\0";
    let text_at = 0x40;
    let names_at = text_at + code.len();
    let headers_at = names_at + names.len();
    let mut out = vec![0u8; 0x40];
    out[..6].copy_from_slice(b"\x7fELF\x02\x01");
    out[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
    out[0x28..0x30].copy_from_slice(&(headers_at as u64).to_le_bytes());
    out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    out[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
    out[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(code);
    out.extend_from_slice(names);
    let section = |name: u32, kind: u32, at: usize, len: usize| {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(&name.to_le_bytes());
        h[4..8].copy_from_slice(&kind.to_le_bytes());
        h[0x18..0x20].copy_from_slice(&(at as u64).to_le_bytes());
        h[0x20..0x28].copy_from_slice(&(len as u64).to_le_bytes());
        h
    };
    out.extend_from_slice(&[0u8; 64]);
    out.extend_from_slice(&section(1, 1, text_at, code.len()));
    out.extend_from_slice(&section(7, 3, names_at, names.len()));
    out
}

/// x86-64 code: `functions` functions of filler, each calling a few of the first ten;
/// `grow` extra bytes in the tenth function move everything after it.
fn x86_code(functions: usize, grow: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(9);
    let mut starts = Vec::new();
    let mut code = Vec::new();
    let mut calls = Vec::new();
    for f in 0..functions {
        starts.push(code.len());
        let body = 200 + if f == 10 { grow } else { 0 };
        for k in 0..body {
            if k % 40 == 0 {
                calls.push((code.len(), rng.usize(..10)));
                code.extend_from_slice(&[0xe8, 0, 0, 0, 0]);
            } else {
                code.push([0x48, 0x89, 0xc7, 0x90][k % 4]);
            }
        }
    }
    for (at, callee) in calls {
        let rel = starts[callee] as i64 - (at as i64 + 5);
        code[at + 1..at + 5].copy_from_slice(&(rel as i32).to_le_bytes());
    }
    code
}

/// Executables get calls rewritten (`AVDELTA3`): the payload is smaller than the same
/// patch without, and applies back to the exact bytes.
#[test]
fn calls_in_executables_are_rewritten_and_restored_exactly() -> Result<(), DeltaError> {
    let old = elf(0x3e, &x86_code(2000, 0));
    let new = elf(0x3e, &x86_code(2000, 37));
    let payload = write_delta(&old, &new, 19, Vec::new())?;
    assert_eq!(&payload[..8], MAGIC_CODE);
    let plain = encode(&old, &new, header(&old, &new, 2), None, 19, Vec::new())?;
    assert!(
        payload.len() * 2 < plain.len(),
        "rewritten {} bytes, plain {}",
        payload.len(),
        plain.len()
    );
    let (h, out) = apply_delta(
        old.as_slice(),
        payload.as_slice(),
        &Sha256::of(&new),
        new.len() as u64,
        Vec::new(),
    )?;
    assert_eq!(h.version, 3);
    assert!(out == new);
    // write_delta_owned makes the same bytes.
    assert!(write_delta_owned(old.clone(), new.clone(), 19, Vec::new())? == payload);
    // A file that is not ELF, or two architectures, get no rewrite.
    let mut arm = new.clone();
    arm[0x12] = 0xb7;
    assert_eq!(&write_delta(&old, &arm, 3, Vec::new())?[..8], MAGIC);
    Ok(())
}

/// A filter record naming another architecture, an unknown one or other regions is
/// refused by the result's hash or as corrupt, never a panic (a region that only grew
/// over bytes without calls may still give the signed result, which is then fine).
#[test]
fn a_lying_filter_record_is_refused() -> Result<(), DeltaError> {
    let old = elf(0x3e, &x86_code(300, 0));
    let new = elf(0x3e, &x86_code(300, 5));
    let payload = write_delta(&old, &new, 3, Vec::new())?;
    let apply = |p: &[u8]| {
        apply_delta(
            old.as_slice(),
            p,
            &Sha256::of(&new),
            new.len() as u64,
            Vec::new(),
        )
        .map(|_| ())
    };
    let at = HEADER_LEN;
    let mut cases = Vec::new();
    for (offset, bytes) in [
        (0, vec![2u8]),
        (0, vec![9u8]),
        (1, u64::MAX.to_le_bytes().to_vec()),
        (9, u64::MAX.to_le_bytes().to_vec()),
        (17, 1u64.to_le_bytes().to_vec()),
        (25, 7u64.to_le_bytes().to_vec()),
    ] {
        let mut p = payload.clone();
        p[at + offset..at + offset + bytes.len()].copy_from_slice(&bytes);
        cases.push(p);
    }
    cases.push(payload[..HEADER_LEN + 10].to_vec());
    for (i, p) in cases.iter().enumerate() {
        let err = apply(p);
        assert!(
            matches!(
                err,
                Err(DeltaError::Corrupt(_)) | Err(DeltaError::ResultMismatch { .. })
            ) || (i == 3 && err.is_ok()),
            "case {i}: {err:?}"
        );
    }
    apply(&payload)
}

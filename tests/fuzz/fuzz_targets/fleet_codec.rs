#![no_main]
//! See `aviary_tests::fuzz_targets::fleet_codec`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    aviary_tests::fuzz_targets::fleet_codec(data);
});

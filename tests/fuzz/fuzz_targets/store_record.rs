#![no_main]
//! See `aviary_control_plane::fuzzing::store_record`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    aviary_tests::fuzz_targets::store_record(data);
});

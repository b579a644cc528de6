#![no_main]
//! See `aviary_tests::fuzz_targets::delta_and_bundle`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    aviary_tests::fuzz_targets::delta_and_bundle(data);
});

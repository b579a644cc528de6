#![no_main]
//! See `aviary_tests::fuzz_targets::overlay`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    aviary_tests::fuzz_targets::overlay(data);
});

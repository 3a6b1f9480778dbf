//! The `spec` reader (see tests/support/readers.rs).
#![no_main]

#[path = "../../tests/support/readers.rs"]
mod readers;

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let _ = (readers::target("spec").read)(&readers::scratch(), input);
});

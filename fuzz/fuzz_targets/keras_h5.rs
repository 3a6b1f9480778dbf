//! The `keras_h5` reader (see tests/support/readers.rs).
#![no_main]

#[path = "../../tests/support/readers.rs"]
mod readers;

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let _ = (readers::target("keras_h5").read)(&readers::scratch(), input);
});

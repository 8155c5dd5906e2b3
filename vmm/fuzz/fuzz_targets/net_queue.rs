//! Fuzzer bytes as the contents of a guest's virtqueues: see
//! `nutshell_vmm::fuzzing::net_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nutshell_vmm::fuzzing::net_queue(data);
});

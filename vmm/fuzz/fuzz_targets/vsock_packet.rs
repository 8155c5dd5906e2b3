//! Fuzzer bytes as the contents of a guest's virtqueue: see
//! `nutshell_vmm::fuzzing::vsock_packet`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nutshell_vmm::fuzzing::vsock_packet(data);
});

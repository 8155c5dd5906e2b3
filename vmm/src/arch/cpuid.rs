//! The CPUID a vCPU sees: what KVM supports on this host, with the topology
//! leaves rewritten for our vCPU count and the features a guest must not use
//! (PMU, which we do not virtualise) cleared.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

/// Failure to compute or set CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Failed to read the CPUID that KVM supports.")]
    Supported(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("Failed to set the vCPU's CPUID.")]
    Set(#[source] kvm_ioctls::Error),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;
const ECX_TSC_DEADLINE_BIT: u32 = 1 << 24;

/// What KVM supports on this host (read once per VM; every vCPU starts from it).
///
/// KVM emulates the LAPIC's TSC-deadline mode everywhere but leaves its
/// CPUID bit to the VMM: with it, Linux skips calibrating the LAPIC timer
/// against the PIT, a check that fails when the host is slow or loaded
/// ("APIC timer disabled due to verification failure", and then no
/// high-resolution timers).
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        set_tsc_deadline(&mut cpuid);
    }
    Ok(cpuid)
}

fn set_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE_BIT;
        }
    }
}

/// Rewrites `cpuid` for vCPU `id` of `count`.
pub fn filter(cpuid: &mut CpuId, id: u8, count: u8) {
    // Bits needed to number `count` logical CPUs (x2APIC topology shift).
    let shift = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR_BIT;
                if count > 1 {
                    e.edx |= EDX_HTT_BIT;
                } else {
                    e.edx &= !EDX_HTT_BIT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. One core per vCPU.
                e.eax = (e.eax & 0x03ff_ffff) | ((u32::from(count.max(1)) - 1) << 26);
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_TOPOLOGY => {
                e.edx = u32::from(id);
                match e.index {
                    // SMT level: one thread per core.
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    // Core level: `count` cores per package.
                    1 => {
                        e.eax = shift;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Sets the filtered CPUID on one vCPU.
pub fn setup(vcpu: &VcpuFd, base: &CpuId, id: u8, count: u8) -> Result<(), CpuidError> {
    let mut cpuid = base.clone();
    filter(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(CpuidError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0008_0800,
            ..Default::default()
        }
    }

    #[test]
    fn topology_leaves_describe_our_vcpus() {
        let mut c = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_PMU, 0),
        ])
        .unwrap();
        filter(&mut c, 2, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2, "APIC id");
        assert_eq!((s[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(s[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(s[0].ecx & ECX_HYPERVISOR_BIT, 0);
        assert_eq!((s[1].ebx, s[1].edx), (1, 2));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 4, 2));
        assert_eq!(s[3].ebx, 0, "no PMU");
    }

    #[test]
    fn tsc_deadline_is_advertised_in_leaf_1_only() {
        let mut c = CpuId::from_entries(&[entry(LEAF_FEATURES, 0), entry(LEAF_PMU, 0)]).unwrap();
        set_tsc_deadline(&mut c);
        let s = c.as_slice();
        assert_ne!(s[0].ecx & ECX_TSC_DEADLINE_BIT, 0);
        assert_eq!(s[1].ecx, 0);
    }
}

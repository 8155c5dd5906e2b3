//! x86_64 specifics: the guest-physical layout, descriptor tables and page
//! tables, CPUID, MSRs and the local APIC.
//!
//! Only x86_64 exists; there is no multi-architecture layer until a second
//! architecture needs one.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

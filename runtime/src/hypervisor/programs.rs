//! Finding the host programs a backend runs.

use std::path::PathBuf;

use super::HypervisorError;

/// Finds `name` on `PATH`, then in `/usr/local/bin`, `/usr/libexec` (where
/// distributions put virtiofsd) and `/usr/bin`: containerd starts shims with
/// a minimal `PATH`.
pub(crate) fn find_program(name: &'static str) -> Result<PathBuf, HypervisorError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/local/bin", "/usr/libexec", "/usr/bin"].map(PathBuf::from));
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| HypervisorError::MissingProgram {
            program: name,
            looked_in: "PATH, /usr/local/bin, /usr/libexec, /usr/bin".into(),
        })
}

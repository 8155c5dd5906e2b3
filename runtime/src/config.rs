//! The runtime's configuration: `/etc/nutshell/config.toml`.
//!
//! Where it comes from, first match wins:
//! 1. the CRI runtime option `ConfigPath` (a containerd runtime's `options`);
//! 2. `$NUTSHELL_CONFIG` in the shim's environment (inherited from
//!    containerd; the tests' private containerd uses it);
//! 3. `/etc/nutshell/config.toml`;
//! 4. the default embedded in the binary (`runtime/config/default.toml`).
//!
//! `default.toml` is the one source of default values: a file only needs
//! the keys it changes, and is laid over the embedded default key by key
//! (as TOML tables) before the result is deserialised with serde, unknown
//! keys refused. [`Config::validate`] then checks what types cannot say
//! (ranges, absolute paths, limits), once, so that a typo fails the pod's
//! creation with a message naming the key and the file instead of
//! surfacing later as a strange VM failure. `serde_path_to_error` gives
//! serde's errors their key (`vm.vcpus`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

/// Where the machine-wide config lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nutshell/config.toml";

/// Environment variable naming a config file (below the CRI option).
pub const CONFIG_ENV: &str = "NUTSHELL_CONFIG";

/// The built-in default, also what `tools/setup.sh` installs.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

/// Name used in errors for the embedded default.
const EMBEDDED: &str = "<embedded default config>";

/// Largest VM the config accepts at all, whatever `max_*` say: beyond this a
/// value is a typo, not a wish.
const VCPUS_CEILING: u32 = 256;
const MEMORY_MIB_CEILING: u32 = 1024 * 1024;
/// The guest kernel and agent need this much to boot.
const MEMORY_MIB_FLOOR: u32 = 64;
/// Bounds of `agent.dial_timeout_ms`.
const DIAL_TIMEOUT_MS: (u64, u64) = (100, 600_000);

/// The VM monitor that runs a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// nutshell's own KVM monitor (`nutshell-vmm`).
    Vmm,
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// `Vmm` where this host's KVM can run a Linux guest, otherwise `Qemu`.
    Auto,
}

impl Backend {
    const ALL: [Self; 3] = [Self::Vmm, Self::Qemu, Self::Auto];

    fn as_str(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Qemu => "qemu",
            Self::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    /// `vmm`, `qemu` or `auto`, as in the config file.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not one of vmm, qemu, auto"))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shim log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The level as a `tracing` filter directive.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// The `[vm]` section: how pods' VMs are made.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub backend: Backend,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    pub kernel_params: String,
    pub debug_console: bool,
}

/// The `[pool]` section: warm VMs ([`crate::pool`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Pods ask the pool for a VM before booting one.
    pub enabled: bool,
    /// The pool's Unix socket.
    pub socket: PathBuf,
    /// Warm VMs of the default size (`vm.vcpus`, `vm.memory_mib`).
    pub warm: u32,
    /// Other sizes the pool keeps warm.
    pub sizes: Vec<PoolSize>,
    /// NICs each warm VM carries; a pod with more interfaces boots cold.
    pub nics: u32,
    /// Each warm VM creates and removes a throw-away container after boot.
    pub warm_up: bool,
}

/// One more size of warm VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSize {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub warm: u32,
}

/// Most warm VMs of one size: beyond this a value is a typo.
const POOL_WARM_CEILING: u32 = 64;

/// The `[agent]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// One overall deadline for boot plus the agent's first answer.
    #[serde(rename = "dial_timeout_ms", deserialize_with = "millis")]
    pub dial_timeout: Duration,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: LogLevel,
}

/// The whole configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vm: VmSettings,
    pub pool: PoolSettings,
    pub agent: AgentSettings,
    pub log: LogSettings,
    /// The file the values came from (`None`: the embedded default only).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by the CRI option or `$NUTSHELL_CONFIG` is unreadable.
    #[error("cannot read the nutshell config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{file}: not valid TOML: {message}")]
    Syntax { file: String, message: String },
    /// A key holds a value nutshell cannot use.
    #[error("{file}: bad value for key `{key}`: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
    /// A key nutshell does not know (most often a typo).
    #[error("{file}: unknown key `{key}` ({known})")]
    UnknownKey {
        file: String,
        key: String,
        known: String,
    },
}

impl ConfigError {
    /// serde's error at `path`, with serde's "unknown field `x`, expected
    /// one of …" turned into [`Self::UnknownKey`].
    fn from_serde(file: &str, path: &serde_path_to_error::Path, reason: String) -> Self {
        let parent = path.to_string();
        let reason = reason.lines().next().unwrap_or_default().to_string();
        let unknown = reason
            .strip_prefix("unknown field `")
            .and_then(|r| r.split_once('`'));
        match unknown {
            Some((name, rest)) => Self::UnknownKey {
                file: file.to_string(),
                // The path already ends with the unknown key.
                key: if parent.ends_with(name) {
                    parent
                } else {
                    name.to_string()
                },
                // toml adds "in `section`" on a line of its own.
                known: rest
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches(',')
                    .trim()
                    .to_string(),
            },
            None => Self::Invalid {
                file: file.to_string(),
                key: parent,
                reason,
            },
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::embedded()
    }
}

impl Config {
    /// The embedded default. A unit test checks that it parses and
    /// validates, so this cannot fail in a built binary; should it ever,
    /// the panic names the broken file rather than running on made-up
    /// values.
    pub fn embedded() -> Self {
        match Self::from_table(Table::new(), EMBEDDED) {
            Ok(cfg) => cfg,
            Err(e) => panic!("the embedded default config is broken: {e}"),
        }
    }

    /// Loads the configuration: `explicit` (the CRI `ConfigPath`) if given,
    /// else `$NUTSHELL_CONFIG`, else [`DEFAULT_CONFIG_PATH`] if it exists,
    /// else the embedded default. An explicitly named file must exist.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(path) = explicit.filter(|p| !p.as_os_str().is_empty()) {
            return Self::from_file(path);
        }
        if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Self::from_file(Path::new(&path));
        }
        let default = Path::new(DEFAULT_CONFIG_PATH);
        if default.exists() {
            return Self::from_file(default);
        }
        Ok(Self::embedded())
    }

    /// Reads `path` and lays it over the embedded default.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_str_named(&text, &path.display().to_string())?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses `text` (named `file` in errors) over the embedded default.
    pub fn from_str_named(text: &str, file: &str) -> Result<Self, ConfigError> {
        Self::from_table(parse_table(text, file)?, file)
    }

    /// `overlay` laid over the embedded default, deserialised and checked.
    fn from_table(overlay: Table, file: &str) -> Result<Self, ConfigError> {
        let mut merged = parse_table(DEFAULT_CONFIG_TOML, EMBEDDED)?;
        overlay_tables(&mut merged, overlay);
        let cfg: Self = serde_path_to_error::deserialize(Value::Table(merged))
            .map_err(|e| ConfigError::from_serde(file, e.path(), e.inner().to_string()))?;
        cfg.validate()
            .map_err(|(key, reason)| ConfigError::Invalid {
                file: file.to_string(),
                key: key.to_string(),
                reason,
            })?;
        Ok(cfg)
    }

    /// What the types cannot say: ranges, absolute paths and limits.
    /// Returns the key and the reason.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let vm = &self.vm;
        in_range("vm.vcpus", vm.vcpus, 1, VCPUS_CEILING)?;
        in_range("vm.max_vcpus", vm.max_vcpus, 1, VCPUS_CEILING)?;
        for (key, mib) in [
            ("vm.memory_mib", vm.memory_mib),
            ("vm.max_memory_mib", vm.max_memory_mib),
        ] {
            in_range(key, mib, MEMORY_MIB_FLOOR, MEMORY_MIB_CEILING)?;
        }
        in_range("pool.warm", self.pool.warm, 0, POOL_WARM_CEILING)?;
        in_range(
            "pool.nics",
            self.pool.nics,
            0,
            crate::network::MAX_INTERFACES as u32,
        )?;
        for size in &self.pool.sizes {
            in_range("pool.sizes.vcpus", size.vcpus, 1, vm.max_vcpus)?;
            in_range(
                "pool.sizes.memory_mib",
                size.memory_mib,
                MEMORY_MIB_FLOOR,
                vm.max_memory_mib,
            )?;
            in_range("pool.sizes.warm", size.warm, 0, POOL_WARM_CEILING)?;
        }
        if !self.pool.socket.is_absolute() {
            return Err((
                "pool.socket",
                format!("\"{}\" is not an absolute path", self.pool.socket.display()),
            ));
        }
        let ms = u64::try_from(self.agent.dial_timeout.as_millis()).unwrap_or(u64::MAX);
        in_range(
            "agent.dial_timeout_ms",
            ms,
            DIAL_TIMEOUT_MS.0,
            DIAL_TIMEOUT_MS.1,
        )?;
        for (key, path) in [("vm.kernel", &vm.kernel), ("vm.initrd", &vm.initrd)] {
            if !path.is_absolute() {
                return Err((
                    key,
                    format!("\"{}\" is not an absolute path", path.display()),
                ));
            }
        }
        if vm.vcpus > vm.max_vcpus {
            return Err((
                "vm.vcpus",
                format!("{} is above vm.max_vcpus ({})", vm.vcpus, vm.max_vcpus),
            ));
        }
        if vm.memory_mib > vm.max_memory_mib {
            return Err((
                "vm.memory_mib",
                format!(
                    "{} is above vm.max_memory_mib ({})",
                    vm.memory_mib, vm.max_memory_mib
                ),
            ));
        }
        Ok(())
    }

    /// The VM of a pod of `vcpus` and `memory_mib`, its state in `dir`
    /// and `shared` shared into it: the one place a pod's VM is described,
    /// for a cold boot and for the warm pool alike.
    pub fn vm_config(
        &self,
        id: &str,
        dir: &Path,
        shared: &Path,
        vcpus: u32,
        memory_mib: u32,
    ) -> crate::hypervisor::VmConfig {
        let mut vm = crate::hypervisor::VmConfig::new(id, dir);
        vm.kernel = self.vm.kernel.clone();
        vm.initrd = self.vm.initrd.clone();
        vm.kernel_params = self
            .vm
            .kernel_params
            .split_whitespace()
            .map(String::from)
            .collect();
        vm.vcpus = vcpus;
        vm.memory_mib = memory_mib;
        vm.shared_dir = Some(shared.to_path_buf());
        vm.accel = crate::hypervisor::Accel::Auto;
        vm.debug_console = self.vm.debug_console;
        vm
    }

    /// Where the values came from, for messages.
    pub fn source_name(&self) -> String {
        self.source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| EMBEDDED.to_string())
    }
}

fn in_range<T: PartialOrd + fmt::Display>(
    key: &'static str,
    v: T,
    min: T,
    max: T,
) -> Result<(), (&'static str, String)> {
    if v < min || v > max {
        return Err((key, format!("{v} is outside {min}..={max}")));
    }
    Ok(())
}

/// Lays `over` onto `base` key by key: a table merges into a table, any
/// other value replaces. Keys `base` lacks are kept, so that serde names them
/// as unknown.
fn overlay_tables(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => overlay_tables(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn parse_table(text: &str, file: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        file: file.to_string(),
        message: e.to_string().trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::GUEST_ASSETS_DIR;

    fn err(text: &str) -> String {
        Config::from_str_named(text, "/etc/nutshell/test.toml")
            .expect_err("config must be refused")
            .to_string()
    }

    #[test]
    fn embedded_default_parses_and_validates() {
        let cfg = Config::from_table(Table::new(), EMBEDDED).expect("valid default");
        assert_eq!(cfg.vm.backend, Backend::Auto);
        assert_eq!(cfg.vm.kernel, Path::new(GUEST_ASSETS_DIR).join("vmlinux"));
        assert!(cfg.vm.initrd.starts_with(GUEST_ASSETS_DIR));
        assert_eq!(cfg.agent.dial_timeout, Duration::from_secs(20));
        assert_eq!(cfg.log.level, LogLevel::Info);
        assert_eq!(cfg.source, None);
    }

    #[test]
    fn backend_names_parse_and_print_alike() {
        for b in Backend::ALL {
            assert_eq!(b.to_string().parse::<Backend>(), Ok(b));
        }
        assert!("xen".parse::<Backend>().is_err());
    }

    #[test]
    fn a_file_overrides_only_its_keys() {
        let cfg = Config::from_str_named(
            "[vm]\nbackend = \"qemu\"\nvcpus = 2\n[agent]\ndial_timeout_ms = 1500\n[log]\nlevel = \"debug\"\n",
            "x.toml",
        )
        .expect("valid");
        assert_eq!(cfg.vm.backend, Backend::Qemu);
        assert_eq!(cfg.vm.vcpus, 2);
        assert_eq!(cfg.vm.memory_mib, 256, "untouched key keeps the default");
        assert_eq!(cfg.agent.dial_timeout, Duration::from_millis(1500));
        assert_eq!(cfg.log.level, LogLevel::Debug);
    }

    #[test]
    fn bad_backend_names_key_and_file() {
        let e = err("[vm]\nbackend = \"xen\"\n");
        assert!(e.contains("/etc/nutshell/test.toml"), "{e}");
        assert!(e.contains("`vm.backend`"), "{e}");
        assert!(e.contains("xen") && e.contains("`qemu`"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = err("[vm]\nvcpus = \"two\"\n");
        assert!(
            e.contains("`vm.vcpus`") && e.contains("invalid type"),
            "{e}"
        );
        let e = err("[vm]\ndebug_console = 1\n");
        assert!(e.contains("`vm.debug_console`"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        assert!(err("[vm]\nvcpus = 0\n").contains("`vm.vcpus`"));
        assert!(err("[vm]\nmemory_mib = 16\n").contains("`vm.memory_mib`"));
        assert!(err("[vm]\nmemory_mib = -1\n").contains("`vm.memory_mib`"));
        assert!(err("[agent]\ndial_timeout_ms = 5\n").contains("`agent.dial_timeout_ms`"));
        let e = err("[vm]\nvcpus = 8\nmax_vcpus = 4\n");
        assert!(e.contains("`vm.vcpus`") && e.contains("max_vcpus"), "{e}");
    }

    #[test]
    fn pool_sizes_and_socket_are_checked() {
        assert!(err("[pool]\nwarm = 1000\n").contains("`pool.warm`"));
        assert!(err("[pool]\nnics = 65\n").contains("`pool.nics`"));
        assert!(err("[pool]\nsocket = \"pool.sock\"\n").contains("`pool.socket`"));
        let e = err("[pool]\nsizes = [{ vcpus = 64, memory_mib = 512, warm = 1 }]\n");
        assert!(e.contains("`pool.sizes.vcpus`"), "{e}");
        let e = err("[pool]\nsizes = [{ vcpus = 1, memory_mib = 512 }]\n");
        assert!(e.contains("warm"), "{e}");
        let c = Config::from_str_named(
            "[pool]\nenabled = false\nsizes = [{ vcpus = 2, memory_mib = 512, warm = 3 }]\n",
            "t.toml",
        )
        .unwrap();
        assert!(!c.pool.enabled);
        assert_eq!(
            c.pool.sizes,
            [PoolSize {
                vcpus: 2,
                memory_mib: 512,
                warm: 3
            }]
        );
        assert_eq!(c.pool.warm, Config::embedded().pool.warm);
        // Warm VMs warm up unless told not to.
        assert!(c.pool.warm_up);
        let c = Config::from_str_named("[pool]\nwarm_up = false\n", "t.toml").unwrap();
        assert!(!c.pool.warm_up);
    }

    #[test]
    fn relative_kernel_path_is_refused() {
        let e = err("[vm]\nkernel = \"vmlinux\"\n");
        assert!(e.contains("`vm.kernel`") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn unknown_keys_and_sections_are_refused() {
        let e = err("[vm]\nvcpu = 2\n");
        assert!(
            e.starts_with("/etc/nutshell/test.toml: unknown key `vm.vcpu` (expected one of")
                && e.contains("`vcpus`"),
            "{e}"
        );
        assert!(err("[network]\nx = 1\n").contains("unknown key `network`"));
        assert!(err("backend = \"qemu\"\n").contains("unknown key `backend`"));
        let e = err("[agent]\ndial_timeout = 5\n");
        assert!(e.contains("unknown key `agent.dial_timeout`"), "{e}");
    }

    #[test]
    fn bad_log_level_is_refused() {
        let e = err("[log]\nlevel = \"loud\"\n");
        assert!(e.contains("`log.level`"), "{e}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let e = err("[vm\nvcpus = 2\n");
        assert!(
            e.starts_with("/etc/nutshell/test.toml: not valid TOML"),
            "{e}"
        );
    }

    #[test]
    fn explicit_file_is_read_and_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[vm]\nmemory_mib = 512\n").expect("write");
        let cfg = Config::load(Some(&path)).expect("loads");
        assert_eq!(cfg.vm.memory_mib, 512);
        assert_eq!(cfg.source.as_deref(), Some(path.as_path()));
        let missing = dir.path().join("missing.toml");
        let e = Config::load(Some(&missing))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn a_bad_file_names_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[vm]\nbackend = 3\n").expect("write");
        let e = Config::from_file(&path).expect_err("bad").to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("`vm.backend`"),
            "{e}"
        );
    }
}

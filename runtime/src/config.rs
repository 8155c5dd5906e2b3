//! The runtime's configuration: `/etc/nutshell/config.toml`.
//!
//! Where it comes from, first match wins:
//! 1. the CRI runtime option `ConfigPath` (a containerd runtime's `options`);
//! 2. `$NUTSHELL_CONFIG` in the shim's environment (inherited from
//!    containerd; the tests' private containerd uses it);
//! 3. `/etc/nutshell/config.toml`;
//! 4. the default embedded in the binary (`runtime/config/default.toml`).
//!
//! A file only needs the keys it changes: it is laid over the embedded
//! default key by key. Every value is checked here, once, so that a typo
//! fails the pod's creation with a message naming the key and the file
//! instead of surfacing later as a strange VM failure. The file is walked as
//! a TOML table rather than deserialised with serde so that every error can
//! name its key (`vm.vcpus`), not only a line and column.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::hypervisor::GUEST_ASSETS_DIR;

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

/// The VM monitor that runs a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// nutshell's own KVM monitor (`nutshell-vmm`).
    Vmm,
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// `Vmm` where this host's KVM can run a Linux guest, otherwise `Qemu`.
    Auto,
}

impl Backend {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "vmm" => Some(Self::Vmm),
            "qemu" => Some(Self::Qemu),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    /// `vmm`, `qemu` or `auto`, as in the config file.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| format!("{s:?} is not one of vmm, qemu, auto"))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vmm => "vmm",
            Self::Qemu => "qemu",
            Self::Auto => "auto",
        })
    }
}

/// Shim log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "error" => Some(Self::Error),
            "warn" => Some(Self::Warn),
            "info" => Some(Self::Info),
            "debug" => Some(Self::Debug),
            "trace" => Some(Self::Trace),
            _ => None,
        }
    }

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

/// The `[vm]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
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

/// The `[agent]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// One overall deadline for boot plus the agent's first answer.
    pub dial_timeout: Duration,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: LogLevel,
}

/// The whole configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub vm: VmConfig,
    pub agent: AgentConfig,
    pub log: LogConfig,
    /// The file the values came from (`None`: the embedded default only).
    pub source: Option<PathBuf>,
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
    #[error("{file}: unknown key `{key}`")]
    UnknownKey { file: String, key: String },
}

impl Default for Config {
    fn default() -> Self {
        Self::embedded()
    }
}

impl Config {
    /// The embedded default. It is checked by a unit test, so this cannot
    /// fail in a built binary; should it ever, a hard-coded fallback serves.
    pub fn embedded() -> Self {
        let mut cfg = Self::fallback();
        match parse_table(DEFAULT_CONFIG_TOML, EMBEDDED) {
            Ok(table) => match cfg.apply(&table, EMBEDDED) {
                Ok(()) => cfg,
                Err(_) => Self::fallback(),
            },
            Err(_) => cfg,
        }
    }

    /// Values used only if the embedded file were broken.
    fn fallback() -> Self {
        Self {
            vm: VmConfig {
                backend: Backend::Auto,
                kernel: Path::new(GUEST_ASSETS_DIR).join("vmlinux"),
                initrd: Path::new(GUEST_ASSETS_DIR).join("initramfs.cpio.gz"),
                vcpus: 1,
                memory_mib: 256,
                max_vcpus: 4,
                max_memory_mib: 4096,
                kernel_params: String::new(),
                debug_console: false,
            },
            agent: AgentConfig {
                dial_timeout: Duration::from_secs(20),
            },
            log: LogConfig {
                level: LogLevel::Info,
            },
            source: None,
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
        let table = parse_table(text, file)?;
        let mut cfg = Self::embedded();
        cfg.apply(&table, file)?;
        Ok(cfg)
    }

    fn apply(&mut self, table: &Table, file: &str) -> Result<(), ConfigError> {
        let ctx = Ctx { file };
        for (section, value) in table {
            let Value::Table(t) = value else {
                return Err(ctx.invalid(section, "expected a section ([name])"));
            };
            match section.as_str() {
                "vm" => self.apply_vm(t, &ctx)?,
                "agent" => self.apply_agent(t, &ctx)?,
                "log" => self.apply_log(t, &ctx)?,
                _ => return Err(ctx.unknown(section)),
            }
        }
        self.check_limits(&ctx)
    }

    fn apply_vm(&mut self, t: &Table, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        let vm = &mut self.vm;
        for (key, value) in t {
            let full = format!("vm.{key}");
            match key.as_str() {
                "backend" => {
                    let s = ctx.string(&full, value)?;
                    vm.backend = Backend::parse(s).ok_or_else(|| {
                        ctx.invalid(
                            &full,
                            &format!("\"{s}\" is not one of \"vmm\", \"qemu\", \"auto\""),
                        )
                    })?;
                }
                "kernel" => vm.kernel = ctx.abs_path(&full, value)?,
                "initrd" => vm.initrd = ctx.abs_path(&full, value)?,
                "vcpus" => vm.vcpus = ctx.int_in(&full, value, 1, VCPUS_CEILING)?,
                "max_vcpus" => vm.max_vcpus = ctx.int_in(&full, value, 1, VCPUS_CEILING)?,
                "memory_mib" => {
                    vm.memory_mib =
                        ctx.int_in(&full, value, MEMORY_MIB_FLOOR, MEMORY_MIB_CEILING)?
                }
                "max_memory_mib" => {
                    vm.max_memory_mib =
                        ctx.int_in(&full, value, MEMORY_MIB_FLOOR, MEMORY_MIB_CEILING)?
                }
                "kernel_params" => vm.kernel_params = ctx.string(&full, value)?.to_string(),
                "debug_console" => vm.debug_console = ctx.boolean(&full, value)?,
                _ => return Err(ctx.unknown(&full)),
            }
        }
        Ok(())
    }

    fn apply_agent(&mut self, t: &Table, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        for (key, value) in t {
            let full = format!("agent.{key}");
            match key.as_str() {
                "dial_timeout_ms" => {
                    let ms = ctx.int_in(&full, value, 100, 600_000)?;
                    self.agent.dial_timeout = Duration::from_millis(u64::from(ms));
                }
                _ => return Err(ctx.unknown(&full)),
            }
        }
        Ok(())
    }

    fn apply_log(&mut self, t: &Table, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        for (key, value) in t {
            let full = format!("log.{key}");
            match key.as_str() {
                "level" => {
                    let s = ctx.string(&full, value)?;
                    self.log.level = LogLevel::parse(s).ok_or_else(|| {
                        ctx.invalid(
                            &full,
                            &format!(
                                "\"{s}\" is not one of \"error\", \"warn\", \"info\", \"debug\", \"trace\""
                            ),
                        )
                    })?;
                }
                _ => return Err(ctx.unknown(&full)),
            }
        }
        Ok(())
    }

    fn check_limits(&self, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        if self.vm.vcpus > self.vm.max_vcpus {
            return Err(ctx.invalid(
                "vm.vcpus",
                &format!(
                    "{} is above vm.max_vcpus ({})",
                    self.vm.vcpus, self.vm.max_vcpus
                ),
            ));
        }
        if self.vm.memory_mib > self.vm.max_memory_mib {
            return Err(ctx.invalid(
                "vm.memory_mib",
                &format!(
                    "{} is above vm.max_memory_mib ({})",
                    self.vm.memory_mib, self.vm.max_memory_mib
                ),
            ));
        }
        Ok(())
    }

    /// Where the values came from, for messages.
    pub fn source_name(&self) -> String {
        self.source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| EMBEDDED.to_string())
    }
}

fn parse_table(text: &str, file: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        file: file.to_string(),
        message: e.to_string().trim().to_string(),
    })
}

/// The file being applied, for error messages.
struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn invalid(&self, key: &str, reason: &str) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    fn unknown(&self, key: &str) -> ConfigError {
        ConfigError::UnknownKey {
            file: self.file.to_string(),
            key: key.to_string(),
        }
    }

    fn string<'v>(&self, key: &str, v: &'v Value) -> Result<&'v str, ConfigError> {
        v.as_str()
            .ok_or_else(|| self.invalid(key, &format!("expected a string, found {}", v.type_str())))
    }

    fn boolean(&self, key: &str, v: &Value) -> Result<bool, ConfigError> {
        v.as_bool().ok_or_else(|| {
            self.invalid(
                key,
                &format!("expected true or false, found {}", v.type_str()),
            )
        })
    }

    fn int_in(&self, key: &str, v: &Value, min: u32, max: u32) -> Result<u32, ConfigError> {
        let i = v.as_integer().ok_or_else(|| {
            self.invalid(key, &format!("expected an integer, found {}", v.type_str()))
        })?;
        u32::try_from(i)
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| self.invalid(key, &format!("{i} is outside {min}..={max}")))
    }

    fn abs_path(&self, key: &str, v: &Value) -> Result<PathBuf, ConfigError> {
        let s = self.string(key, v)?;
        let p = PathBuf::from(s);
        if !p.is_absolute() {
            return Err(self.invalid(key, &format!("\"{s}\" is not an absolute path")));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_str_named(text, "/etc/nutshell/test.toml")
            .expect_err("config must be refused")
            .to_string()
    }

    #[test]
    fn embedded_default_parses_and_matches_fallback_values() {
        let table = parse_table(DEFAULT_CONFIG_TOML, EMBEDDED).expect("valid TOML");
        let mut cfg = Config::fallback();
        cfg.apply(&table, EMBEDDED).expect("valid values");
        assert_eq!(
            cfg,
            Config::fallback(),
            "embedded default and fallback drifted"
        );
        assert_eq!(Config::embedded().vm.backend, Backend::Auto);
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
        assert!(e.contains("\"xen\""), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = err("[vm]\nvcpus = \"two\"\n");
        assert!(
            e.contains("`vm.vcpus`") && e.contains("expected an integer"),
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
    fn relative_kernel_path_is_refused() {
        let e = err("[vm]\nkernel = \"vmlinux\"\n");
        assert!(e.contains("`vm.kernel`") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn unknown_keys_and_sections_are_refused() {
        assert!(err("[vm]\nvcpu = 2\n").contains("unknown key `vm.vcpu`"));
        assert!(err("[network]\nx = 1\n").contains("unknown key `network`"));
        assert!(err("backend = \"qemu\"\n").contains("`backend`"));
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

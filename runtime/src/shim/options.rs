//! The runtime options containerd hands the shim in CreateTaskRequest.
//!
//! For a runtime that is not runc, containerd's CRI plugin encodes the
//! runtime's `options` table as `runtimeoptions.v1.Options` (`type_url` = 1,
//! `config_path` = 2, `config_body` = 3): the TOML key `ConfigPath` lands
//! in field 2. The message is three fields, so it is decoded here with
//! protobuf's wire reader instead of vendoring containerd's `.proto`.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::rt::WireType;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

/// The type URL of CRI's options for non-runc runtimes.
pub const RUNTIME_OPTIONS_TYPE_URL: &str = "runtimeoptions.v1.Options";

/// Longest config path accepted.
const MAX_PATH: usize = 4096;

/// The `ConfigPath` of the options, when they carry one.
pub fn config_path(options: Option<&Any>) -> Option<PathBuf> {
    let any = options?;
    if !any.type_url.ends_with(RUNTIME_OPTIONS_TYPE_URL) {
        return None;
    }
    let mut is = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == WireType::LengthDelimited as u32 {
            match is.read_string() {
                Ok(s) if !s.is_empty() && s.len() <= MAX_PATH => path = Some(PathBuf::from(s)),
                Ok(_) => {}
                Err(_) => return None,
            }
        } else {
            let w = WireType::new(wire)?;
            if is.skip_field(w).is_err() {
                return None;
            }
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::CodedOutputStream;

    fn encode(type_url: &str, path: &str) -> Vec<u8> {
        let mut v = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut v);
            os.write_string(1, type_url).unwrap();
            os.write_string(2, path).unwrap();
            os.write_bytes(3, b"[vm]\n").unwrap();
            os.flush().unwrap();
        }
        v
    }

    #[test]
    fn config_path_is_read() {
        let any = Any {
            type_url: RUNTIME_OPTIONS_TYPE_URL.into(),
            value: encode("io.containerd.nutshell.v1", "/etc/nutshell/pod.toml"),
            ..Default::default()
        };
        assert_eq!(
            config_path(Some(&any)),
            Some(PathBuf::from("/etc/nutshell/pod.toml"))
        );
    }

    #[test]
    fn other_options_and_garbage_give_none() {
        assert_eq!(config_path(None), None);
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: encode("x", "/p"),
            ..Default::default()
        };
        assert_eq!(config_path(Some(&runc)), None);
        let garbage = Any {
            type_url: RUNTIME_OPTIONS_TYPE_URL.into(),
            value: vec![0x12, 0xff, 0xff, 0xff],
            ..Default::default()
        };
        assert_eq!(config_path(Some(&garbage)), None);
    }
}

//! Generates the Rust types and the async ttrpc client/server from
//! `proto/agent.proto` at build time, with the pure-Rust protobuf parser
//! (no `protoc` needed).

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the ttrpc code from proto/agent.proto");

    let mods = ["agent", "agent_ttrpc"]
        .iter()
        .map(|m| {
            format!(
                "#[allow(clippy::all, clippy::pedantic, clippy::undocumented_unsafe_blocks, missing_docs)]\n\
                 #[path = \"{out_dir}/{m}.rs\"]\npub mod {m};\n"
            )
        })
        .collect::<String>();
    std::fs::write(format!("{out_dir}/mods.rs"), mods).expect("writing mods.rs to OUT_DIR");
}

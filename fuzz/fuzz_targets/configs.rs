//! The TOML a user writes: node and lighthouse configs, pipelines (and a
//! pipeline as JSON, as `tern run` sends it), and the kubeconfig a service
//! reads.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tern_runner_core::pipeline::Pipeline;
use tern_shared::config::{LighthouseConfig, NodeConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(pipeline) = serde_json::from_slice::<Pipeline>(data) {
        let _ = pipeline.validate();
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/etc/tern/fuzz.toml");
    let _ = NodeConfig::parse(text, file);
    let _ = LighthouseConfig::parse(text, file);
    if let Err(e) = Pipeline::parse(text, file) {
        let _ = e.located(file, text);
    }
    let _ = tern_shared::kubeconfig::parse(text, Path::new("/etc/tern/kubeconfig"), None);
});

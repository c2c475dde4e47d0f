//! Tern over TCP: HOST:PORT targets, proxy URLs (from HTTPS_PROXY),
//! NO_PROXY lists, and the proxy's answer to CONNECT.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_shared::transport;

fuzz_target!(|data: &[u8]| {
    let _ = transport::parse_connect_response(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(target) = transport::StreamTarget::parse(text) {
        let shown = target.to_string();
        assert_eq!(transport::StreamTarget::parse(&shown).ok(), Some(target));
    }
    let _ = transport::ProxyUrl::parse(text);
    let (list, host) = text.split_once('\n').unwrap_or((text, "example.internal"));
    let _ = transport::no_proxy_matches(list, host);
});

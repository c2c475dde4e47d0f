//! What programs on the node's host send its SOCKS5 and HTTP CONNECT
//! listeners: greetings, requests, UDP datagrams, request heads. A parse
//! never claims more bytes than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_node_core::{http_connect, socks};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = socks::parse_greeting(data) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = socks::parse_request(data) {
        assert!(used <= data.len());
    }
    let _ = socks::parse_udp(data);
    if let Ok(Some((_, used))) = http_connect::parse(data) {
        assert!(used <= data.len());
    }
});

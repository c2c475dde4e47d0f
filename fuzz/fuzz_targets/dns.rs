//! DNS as the node parses it: queries from programs on its host and
//! answers from resolvers and gateways.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_node_core::dns;

fuzz_target!(|data: &[u8]| {
    let _ = dns::parse_query(data);
    let _ = dns::summarize(data);
    let _ = dns::addresses(data);
    let fitted = dns::fit_udp(data, 512);
    let _ = dns::summarize(&fitted);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dns::reverse_v4(text);
        let _ = dns::record_type(text);
    }
});

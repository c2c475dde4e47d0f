//! SOCKS5.

//! Loopback ports for the parts a test starts itself, and for addresses
//! where nothing listens.

/// A port on 127.0.0.1 that was free a moment ago: bound, noted and closed.
/// Whatever the test starts there next has it, and until then nothing
/// listens on it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

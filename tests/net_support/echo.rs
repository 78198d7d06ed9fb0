//! One exchange with the guest's echo service, shared by the counter
//! clients of the `net_*` tests, the outage bench and the `ferry up` tests.

use std::io::{BufRead, Write};
use std::time::Duration;

/// What the counter client saw.
#[derive(Debug)]
pub struct EchoReport {
    /// Counters sent and echoed back, in order.
    pub echoed: u32,
    /// The longest time between two consecutive echoes.
    pub longest_gap: Duration,
    /// The first mismatch or error, if any.
    pub error: Option<String>,
}

/// Sends counter `n` and waits for its echo; what went wrong otherwise.
pub fn exchange(writer: &mut impl Write, reader: &mut impl BufRead, n: u32) -> Result<(), String> {
    writer
        .write_all(format!("{n}\n").as_bytes())
        .map_err(|e| format!("send {n}: {e}"))?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err(format!("closed before echoing {n}")),
        Err(e) => Err(format!("no echo of {n}: {e}")),
        Ok(_) if line.trim() != n.to_string() => Err(format!("sent {n}, got {line:?}")),
        Ok(_) => Ok(()),
    }
}

//! The Redis behind a cluster, seen from outside: its CPU from `/proc` (`--redis-pid`) and
//! its `total_commands_processed` from `INFO stats` (`--redis ADDR`), taken at every barrier
//! like the server's figures, so a step reports Redis CPU and Redis commands per message.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use crate::clock::sample_procs;

/// Redis at one barrier. `commands` counts the `INFO` calls of the sampler too (one each).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RedisSample {
    pub cpu_s: f64,
    pub commands: Option<u64>,
}

/// Where the Redis figures come from.
#[derive(Clone, Debug, Default)]
pub struct RedisProbe {
    pub pid: Option<u32>,
    pub addr: Option<SocketAddrV4>,
}

impl RedisProbe {
    pub fn is_set(&self) -> bool {
        self.pid.is_some() || self.addr.is_some()
    }

    pub fn sample(&self) -> Option<RedisSample> {
        if !self.is_set() {
            return None;
        }
        Some(RedisSample {
            cpu_s: self.pid.map_or(0.0, |p| sample_procs(&[p]).cpu_s),
            commands: self.addr.and_then(|a| commands_processed(a).ok()),
        })
    }
}

/// `total_commands_processed` from `INFO stats` (an inline command, a bulk-string reply).
pub fn commands_processed(addr: SocketAddrV4) -> Result<u64, String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"INFO stats\r\n").map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(v) = parse_info_reply(&buf)? {
            return v.ok_or_else(|| "no total_commands_processed in INFO".to_string());
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("redis closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `Ok(None)` while the reply is incomplete; then the counter, if the reply has it.
fn parse_info_reply(buf: &[u8]) -> Result<Option<Option<u64>>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..eol]).map_err(|e| e.to_string())?;
    let len: usize = head
        .strip_prefix('$')
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| format!("unexpected INFO reply '{head}'"))?;
    let body = &buf[eol + 2..];
    if body.len() < len {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&body[..len]);
    Ok(Some(text.lines().find_map(|l| {
        l.strip_prefix("total_commands_processed:")
            .and_then(|v| v.trim().parse().ok())
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_reply_is_read_once_complete() {
        let body = "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:1234\r\n";
        let whole = format!("${}\r\n{body}\r\n", body.len());
        assert_eq!(
            parse_info_reply(whole.as_bytes()).unwrap(),
            Some(Some(1234))
        );
        assert_eq!(parse_info_reply(&whole.as_bytes()[..20]).unwrap(), None);
        assert_eq!(parse_info_reply(b"$5\r\nab").unwrap(), None);
        assert_eq!(parse_info_reply(b"$2\r\nab\r\n").unwrap(), Some(None));
        assert!(parse_info_reply(b"-ERR nope\r\n").is_err());
    }
}

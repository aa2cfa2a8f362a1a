//! Which IP a request comes from: the peer address, or, when the peer is a proxy the operator
//! trusts (`gateway_trusted_proxies`), the rightmost `X-Forwarded-For` entry that is not one of
//! those proxies. Entries left of that are whatever the client wrote and are never believed.

use std::net::IpAddr;

use actix_web::HttpRequest;
use ipnet::IpNet;

/// Most `X-Forwarded-For` entries looked at, from the right; a longer chain is a forgery or a
/// misconfiguration, and the leftmost entry looked at is taken.
const MAX_HOPS: usize = 16;

/// The proxies whose `X-Forwarded-For` entries are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses a comma-separated list of CIDRs or single addresses (`10.0.0.0/8, 192.0.2.7`).
    pub fn parse(list: &str) -> Result<Self, String> {
        let nets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is neither a CIDR nor an IP address"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's IP for `req`.
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok());
        Some(self.resolve(peer, forwarded))
    }

    /// Walks the chain from the peer leftwards while each hop is trusted; the first hop that is
    /// not (or cannot be read) ends the walk. Header values are in the order they arrived.
    fn resolve<'a>(&self, peer: IpAddr, headers: impl Iterator<Item = &'a str>) -> IpAddr {
        let mut client = canonical(peer);
        if !self.trusts(client) {
            return client;
        }
        let entries: Vec<&str> = headers.flat_map(|h| h.split(',')).collect();
        for entry in entries.iter().rev().take(MAX_HOPS) {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.trusts(client) {
                        break;
                    }
                }
                // A trusted proxy wrote something we cannot read: the last hop we could is
                // the client as far as we know.
                Err(_) => break,
            }
        }
        client
    }
}

/// IPv4 addresses mapped into IPv6 (`::ffff:10.0.0.1`, what a dual-stack socket reports) as
/// IPv4, so one limit and one CIDR apply to both spellings.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// Without trusted proxies the header is ignored; behind them the rightmost untrusted hop is
    /// the client, whatever the client wrote to its left.
    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.resolve(ip("10.1.2.3"), ["6.6.6.6"].into_iter()),
            ip("10.1.2.3")
        );

        let ingress = TrustedProxies::parse("10.0.0.0/8, 192.0.2.7").expect("parse");
        // The ingress (10.1.2.3) appended the real client (203.0.113.9) after a forged entry.
        let forged = ["6.6.6.6, 203.0.113.9"];
        assert_eq!(
            ingress.resolve(ip("10.1.2.3"), forged.into_iter()),
            ip("203.0.113.9")
        );
        // Two trusted hops, the header split over two lines.
        let chain = ["1.1.1.1, 203.0.113.9", "192.0.2.7"];
        assert_eq!(
            ingress.resolve(ip("10.1.2.3"), chain.into_iter()),
            ip("203.0.113.9")
        );
        // An untrusted peer's header is never read.
        assert_eq!(
            ingress.resolve(ip("198.51.100.1"), forged.into_iter()),
            ip("198.51.100.1")
        );
        // Garbage from a trusted hop: the last readable hop.
        let garbage = ["203.0.113.9, nonsense"];
        assert_eq!(
            ingress.resolve(ip("10.1.2.3"), garbage.into_iter()),
            ip("10.1.2.3")
        );
        // No header: the peer.
        assert_eq!(
            ingress.resolve(ip("10.1.2.3"), std::iter::empty()),
            ip("10.1.2.3")
        );
        // A mapped IPv4 peer is trusted as its IPv4 form, and clients are reported as IPv4.
        let mapped = ["::ffff:203.0.113.9"];
        assert_eq!(
            ingress.resolve(ip("::ffff:10.1.2.3"), mapped.into_iter()),
            ip("203.0.113.9")
        );
    }

    /// Bad entries are refused by name.
    #[test]
    fn bad_lists_are_refused() {
        assert!(TrustedProxies::parse("").expect("empty").nets.is_empty());
        let err = TrustedProxies::parse("10.0.0.0/8, ingress").expect_err("name");
        assert!(err.contains("ingress"), "{err}");
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
    }
}

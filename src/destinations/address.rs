//! Which addresses a destination may reach (server-side request forgery):
//! a customer's URL must not lead Traitline to its own network, the
//! machine itself or a cloud's metadata service. The check is made on
//! the addresses a connection would use, when it is made (a name that
//! resolves to a public address when defined and a private one later is
//! still refused), and redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why an address is refused, or `None` when it is public.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        // 169.254.169.254 is the metadata service of most clouds.
        Some("a link-local or cloud metadata address")
    } else if a == 100 && (64..128).contains(&b) {
        // Shared address space; Alibaba's metadata is 100.100.100.200.
        Some("a carrier-grade NAT or cloud metadata address")
    } else if a == 0 || ip.is_broadcast() || a >= 240 {
        Some("a reserved address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if (a == 192 && b == 0 && c == 0) || (a == 198 && (18..20).contains(&b)) {
        Some("a special-purpose address")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    // An IPv4 address written as IPv6 (`::ffff:127.0.0.1`, NAT64's
    // `64:ff9b::/96`, 6to4's `2002::/16`) is judged as that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(embedded_v4(segments[6], segments[7]));
    }
    if segments[0] == 0x2002 {
        return forbidden_v4(embedded_v4(segments[1], segments[2]));
    }
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() || segments[..6] == [0; 6] {
        // `::` and the deprecated IPv4-compatible `::a.b.c.d`.
        Some("a reserved address")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        // Unique local, AWS's IPv6 metadata (`fd00:ec2::254`) among them.
        Some("a private address")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

fn embedded_v4(high: u16, low: u16) -> Ipv4Addr {
    let [a, b] = high.to_be_bytes();
    let [c, d] = low.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Refuses a URL whose host is an address that may not be reached; a
/// name is checked when it is resolved ([`Resolver`]).
pub fn check_host(url: &reqwest::Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        _ => return Ok(()),
    };
    match forbidden(ip) {
        Some(why) => Err(format!(
            "{ip} is {why}; destinations may not reach it (setting destinations-allow-private)"
        )),
        None => Ok(()),
    }
}

/// Resolves a destination's host names, keeping only addresses it may
/// reach: the check happens at connect time, on the very addresses used.
#[derive(Debug, Clone, Copy)]
pub struct Resolver {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || forbidden(a.ip()).is_none())
                .collect();
            if allowed.is_empty() {
                let why = found
                    .first()
                    .and_then(|a| forbidden(a.ip()).map(|why| format!("{} is {why}", a.ip())))
                    .unwrap_or_else(|| "no address".to_owned());
                return Err(format!(
                    "{host} resolves to {why}; destinations may not reach it (setting destinations-allow-private)"
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_refused() {
        for refused in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.1.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "::127.0.0.1",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "224.0.0.1",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(forbidden(ip).is_some(), "{refused} is refused");
        }
        for allowed in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = allowed.parse().unwrap();
            assert_eq!(forbidden(ip), None, "{allowed} is public");
        }
    }

    #[test]
    fn a_literal_address_in_a_url_is_checked_unless_allowed() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(check_host(&url("http://127.0.0.1:8080/h"), false).is_err());
        assert!(check_host(&url("http://[::ffff:7f00:1]/h"), false).is_err());
        assert!(check_host(&url("http://[::1]/h"), false).is_err());
        assert!(check_host(&url("http://127.0.0.1:8080/h"), true).is_ok());
        assert!(check_host(&url("https://8.8.8.8/h"), false).is_ok());
        // Names are checked when resolved.
        assert!(check_host(&url("http://localhost/h"), false).is_ok());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_connect_time() {
        use reqwest::dns::Resolve;
        let name = || "localhost".parse::<reqwest::dns::Name>().unwrap();
        let refused = Resolver {
            allow_private: false,
        }
        .resolve(name())
        .await;
        let error = refused.err().expect("localhost is refused").to_string();
        assert!(error.contains("destinations-allow-private"), "{error}");
        let allowed = Resolver {
            allow_private: true,
        }
        .resolve(name())
        .await
        .expect("allowed when private addresses are");
        assert!(allowed.count() > 0);
    }
}

//! What a reload changes, as a pure function of two configs: `diff` says,
//! the rest of the reload does (binds, loads, primes, switches). No I/O:
//! whether a plugin *file* changed on disk is the loader's question (its
//! digest), not this one's.

use std::net::SocketAddr;

use serde::Serialize;

use super::{Config, FrontendConfig, PoolConfig};

/// One change of a reload, typed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A frontend the running config does not have: bound anew.
    FrontendAdded {
        frontend: String,
    },
    /// A running frontend the new config does not have: it stops listening,
    /// its flows go on.
    FrontendRemoved {
        frontend: String,
    },
    /// The same name on another address or protocol: a new listener, the
    /// old one closes.
    FrontendReplaced {
        frontend: String,
    },
    /// The same listener, now for another pool: new flows go there.
    FrontendMoved {
        frontend: String,
        from: String,
        to: String,
    },
    /// The same listener and pool, other settings (timeouts, caps, logs).
    FrontendChanged {
        frontend: String,
    },
    PoolAdded {
        pool: String,
    },
    PoolRemoved {
        pool: String,
    },
    /// Another balancer, or another config for it: new instances.
    BalancerChanged {
        pool: String,
    },
    /// Another probe or signals (their plugins or settings).
    HealthChanged {
        pool: String,
    },
    /// Backends added, removed or reweighted.
    BackendsChanged {
        pool: String,
    },
    /// Other pool settings (hairpin, source addresses, passive health, ...).
    PoolChanged {
        pool: String,
    },
}

/// The changes from `running` (with each frontend's address as it resolved:
/// a port 0 bound) to `next`, frontends first, in config order.
pub fn diff(running: &Config, resolved: &[(String, SocketAddr)], next: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    for f in &next.frontends {
        let Some(was) = running.frontends.iter().find(|w| w.name == f.name) else {
            changes.push(Change::FrontendAdded { frontend: f.name.clone() });
            continue;
        };
        let addr = resolved.iter().find(|(n, _)| *n == f.name).map(|(_, a)| *a);
        if !same_listener(was, addr, f) {
            changes.push(Change::FrontendReplaced { frontend: f.name.clone() });
        } else if was.pool != f.pool {
            changes.push(Change::FrontendMoved {
                frontend: f.name.clone(),
                from: was.pool.clone(),
                to: f.pool.clone(),
            });
        } else if (FrontendConfig { listen: f.listen, ..was.clone() }) != *f {
            // (The listen address as written may differ: it is the same listener.)
            changes.push(Change::FrontendChanged { frontend: f.name.clone() });
        }
    }
    for was in &running.frontends {
        if !next.frontends.iter().any(|f| f.name == was.name) {
            changes.push(Change::FrontendRemoved { frontend: was.name.clone() });
        }
    }
    for p in &next.pools {
        let Some(was) = running.pools.iter().find(|w| w.name == p.name) else {
            changes.push(Change::PoolAdded { pool: p.name.clone() });
            continue;
        };
        changes.extend(pool_changes(was, p));
    }
    for was in &running.pools {
        if !next.pools.iter().any(|p| p.name == was.name) {
            changes.push(Change::PoolRemoved { pool: was.name.clone() });
        }
    }
    changes
}

/// Is `f` served by the listener of `was` (the same protocol, and the same
/// address as written before or as it resolved)?
pub fn same_listener(was: &FrontendConfig, resolved: Option<SocketAddr>, f: &FrontendConfig) -> bool {
    (was.listen == f.listen || resolved == Some(f.listen)) && was.protocol == f.protocol
}

fn pool_changes(was: &PoolConfig, p: &PoolConfig) -> Vec<Change> {
    let pool = || p.name.clone();
    let mut changes = Vec::new();
    if (&was.balancer, &was.balancer_config) != (&p.balancer, &p.balancer_config) {
        changes.push(Change::BalancerChanged { pool: pool() });
    }
    if (&was.probe, &was.signals) != (&p.probe, &p.signals) {
        changes.push(Change::HealthChanged { pool: pool() });
    }
    if was.backends != p.backends {
        changes.push(Change::BackendsChanged { pool: pool() });
    }
    let rest = |c: &PoolConfig| {
        (c.on_all_down, c.allow_hairpin, c.source_addresses.clone(), c.passive, c.slow_start, c.proxy_protocol)
    };
    if rest(was) != rest(p) {
        changes.push(Change::PoolChanged { pool: pool() });
    }
    changes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(std::path::Path::new("diff.toml"), text).unwrap()
    }

    const BASE: &str = r#"
[[frontend]]
name = "web"
listen = "127.0.0.1:0"
pool = "a"

[[frontend]]
name = "dns"
listen = "127.0.0.1:5353"
protocol = "udp"
pool = "a"

[[pool]]
name = "a"
balancer = "stock:round-robin"
backends = [ { address = "10.0.0.1:80" } ]

[[pool]]
name = "b"
backends = [ { address = "10.0.0.2:80" } ]
"#;

    fn changes(next: &str) -> Vec<Change> {
        // `web` listens on port 0, resolved to 40000.
        let resolved = [("web".to_owned(), "127.0.0.1:40000".parse().unwrap())];
        diff(&parse(BASE), &resolved, &parse(next))
    }

    fn frontend(name: &str) -> String {
        name.to_owned()
    }

    #[test]
    fn the_same_config_changes_nothing() {
        assert_eq!(changes(BASE), []);
    }

    #[test]
    fn frontends_added_removed_replaced_moved_and_changed() {
        let added = BASE.replace(
            "[[pool]]\nname = \"a\"",
            "[[frontend]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\npool = \"b\"\n\n[[pool]]\nname = \"a\"",
        );
        assert_eq!(changes(&added), [Change::FrontendAdded { frontend: frontend("api") }]);
        let removed = BASE.replace(
            "[[frontend]]\nname = \"dns\"\nlisten = \"127.0.0.1:5353\"\nprotocol = \"udp\"\npool = \"a\"\n",
            "",
        );
        assert_eq!(changes(&removed), [Change::FrontendRemoved { frontend: frontend("dns") }]);
        // Another protocol, another address: replaced; the resolved port is the same address.
        let replaced = BASE.replace("protocol = \"udp\"\n", "");
        assert_eq!(changes(&replaced), [Change::FrontendReplaced { frontend: frontend("dns") }]);
        let moved_port = BASE.replace("127.0.0.1:5353", "127.0.0.1:5354");
        assert_eq!(changes(&moved_port), [Change::FrontendReplaced { frontend: frontend("dns") }]);
        let resolved = BASE.replacen("127.0.0.1:0", "127.0.0.1:40000", 1);
        assert_eq!(changes(&resolved), [], "written as it resolved: the same listener");
        let moved = BASE.replacen("pool = \"a\"", "pool = \"b\"", 1);
        assert_eq!(
            changes(&moved),
            [Change::FrontendMoved { frontend: frontend("web"), from: "a".into(), to: "b".into() }]
        );
        let changed = BASE.replacen("pool = \"a\"\n", "pool = \"a\"\nmax_flows = 10\n", 1);
        assert_eq!(changes(&changed), [Change::FrontendChanged { frontend: frontend("web") }]);
    }

    #[test]
    fn pools_added_removed_and_each_kind_of_pool_change() {
        let pool = || "a".to_owned();
        let added = format!("{BASE}\n[[pool]]\nname = \"c\"\nbackends = [ {{ address = \"10.0.0.3:80\" }} ]\n");
        assert_eq!(changes(&added), [Change::PoolAdded { pool: "c".into() }]);
        let removed = BASE.replace("[[pool]]\nname = \"b\"\nbackends = [ { address = \"10.0.0.2:80\" } ]\n", "");
        assert_eq!(changes(&removed), [Change::PoolRemoved { pool: "b".into() }]);
        let balancer = BASE.replace("stock:round-robin", "stock:maglev");
        assert_eq!(changes(&balancer), [Change::BalancerChanged { pool: pool() }]);
        let config = BASE.replace("stock:round-robin\"", "stock:round-robin\"\nbalancer_config = { x = 1 }");
        assert_eq!(changes(&config), [Change::BalancerChanged { pool: pool() }]);
        let probe = BASE.replace(
            "backends = [ { address = \"10.0.0.1:80\" } ]",
            "backends = [ { address = \"10.0.0.1:80\" } ]\n[pool.probe]\nprotocol = \"tcp\"",
        );
        assert_eq!(changes(&probe), [Change::HealthChanged { pool: pool() }]);
        let backends = BASE.replace("{ address = \"10.0.0.1:80\" }", "{ address = \"10.0.0.1:80\", weight = 5 }");
        assert_eq!(changes(&backends), [Change::BackendsChanged { pool: pool() }]);
        // The one hairpin switch is a pool setting, and a stock balancer is handed it.
        let hairpin = BASE.replace("stock:round-robin\"", "stock:round-robin\"\nallow_hairpin = true");
        assert_eq!(changes(&hairpin), [Change::BalancerChanged { pool: pool() }, Change::PoolChanged { pool: pool() }]);
        let slow = BASE.replace("stock:round-robin\"", "stock:round-robin\"\nslow_start = \"10s\"");
        assert_eq!(changes(&slow), [Change::PoolChanged { pool: pool() }]);
    }
}

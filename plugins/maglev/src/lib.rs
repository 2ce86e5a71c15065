//! `stock:maglev`: Maglev consistent hashing (Eisenbud et al., NSDI 2016)
//! with a table size of your choosing. The table depends only on the set of
//! eligible backends (addresses and weights, not their order), so every
//! Fulcrum instance with the same backends sends a flow to the same backend:
//! several instances behind ECMP or DNS agree without talking. When a backend
//! leaves, only its own flows move (about 1/N of them), plus a small spill
//! that shrinks as the table grows.
//!
//! Config: `{ table_size = 65537, hash = "five-tuple", allow_hairpin = false }`.
//! - `table_size`: slots, rounded up to a prime, 101..=1048573; at least
//!   100 per backend keeps the spread even.
//! - `hash`: `"five-tuple"` (client ip and port, frontend ip and port,
//!   protocol) or `"source-ip"` (every flow of a client to one backend).

use fulcrum_sdk::algo::{HashRing, hash_five_tuple, hash_source_ip, next_prime};
use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

/// The default table size: the paper's 65,537.
const DEFAULT_TABLE_SIZE: usize = 65_537;
const MIN_TABLE_SIZE: usize = 101;
const MAX_TABLE_SIZE: usize = 1_048_573;

#[derive(serde::Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Hash {
    #[default]
    FiveTuple,
    SourceIp,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    table_size: Option<usize>,
    hash: Hash,
    allow_hairpin: bool,
}

pub struct Maglev {
    ring: HashRing,
    size: usize,
    hash: Hash,
}

impl Default for Maglev {
    fn default() -> Self {
        Maglev { ring: HashRing::default(), size: DEFAULT_TABLE_SIZE, hash: Hash::FiveTuple }
    }
}

impl Balancer for Maglev {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        let settings = config.parse::<Settings>()?;
        let size = settings.table_size.unwrap_or(DEFAULT_TABLE_SIZE);
        if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
            return Err(format!("table_size {size} is out of range: expected {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}"));
        }
        self.size = next_prime(size);
        self.hash = settings.hash;
        self.ring.set_allow_hairpin(settings.allow_hairpin);
        Ok(())
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.ring.rebuild_sized(backends, self.size);
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        let hash = match self.hash {
            Hash::FiveTuple => hash_five_tuple(flow),
            Hash::SourceIp => hash_source_ip(flow, false),
        };
        self.ring.pick(hash, flow)
    }
}

fulcrum_sdk::export_balancer!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_sdk::testing::{backends, flow};

    fn ten() -> Vec<(String, u32)> {
        (1..=10).map(|i| (format!("10.0.0.{i}:80"), 100)).collect()
    }

    fn set(list: &[(String, u32)]) -> Vec<Backend> {
        let refs: Vec<(&str, u32)> = list.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        backends(&refs)
    }

    fn addr_of(p: &mut Maglev, set: &[Backend], client: &str) -> (u128, u16) {
        match p.select(&flow(client, "10.9.9.9:53")) {
            Selection::Backend(id) => (set[id as usize].ip, set[id as usize].port),
            Selection::Reject => panic!("rejected"),
        }
    }

    #[test]
    fn order_does_not_matter_and_removal_moves_about_a_tenth() {
        let list = ten();
        let (mut a, mut b) = (Maglev::default(), Maglev::default());
        a.init(&Config::new(r#"{"table_size": 65537}"#)).unwrap();
        b.init(&Config::new("{}")).unwrap();
        let forward = set(&list);
        let mut reversed_list = list.clone();
        reversed_list.reverse();
        let reversed = set(&reversed_list);
        a.backends_changed(&forward);
        b.backends_changed(&reversed);
        let clients: Vec<String> = (0..2000).map(|i| format!("10.1.{}.{}:{}", i / 200, i % 200, 1024 + i)).collect();
        let before: Vec<_> = clients.iter().map(|c| addr_of(&mut a, &forward, c)).collect();
        for (c, want) in clients.iter().zip(&before) {
            assert_eq!(&addr_of(&mut b, &reversed, c), want, "same set, another order: same backend");
        }
        let fewer = set(&list[1..]);
        a.backends_changed(&fewer);
        let moved = clients.iter().zip(&before).filter(|(c, was)| addr_of(&mut a, &fewer, c) != **was).count();
        assert!(moved <= 2000 / 10 + 20, "{moved} of 2000 moved");
    }

    #[test]
    fn config_is_checked() {
        let mut p = Maglev::default();
        assert!(p.init(&Config::new(r#"{"table_size": 7}"#)).is_err());
        assert!(p.init(&Config::new(r#"{"hash": "nope"}"#)).is_err());
        p.init(&Config::new(r#"{"table_size": 1000, "hash": "source-ip"}"#)).unwrap();
        assert_eq!(p.size, 1009);
        assert_eq!(p.select(&flow("10.1.1.1:1", "10.9.9.9:80")), Selection::Reject);
    }
}

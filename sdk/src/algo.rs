//! Selection building blocks shared by the stock plugins and the host's
//! built-in fallback: flow hashing, a weighted Maglev table and a smooth
//! weighted round-robin schedule. All are built off the hot path (in
//! `backends_changed`) and answer a pick in O(1).

use crate::types::{Backend, Flow, Protocol};

/// Folded 64x64->128 multiply (wyhash's mixer): fast, well spread, and the same
/// on every platform, so a flow hashes alike in Wasm and natively.
#[inline]
pub fn mix(a: u64, b: u64) -> u64 {
    let r = u128::from(a ^ 0xa076_1d64_78bd_642f) * u128::from(b ^ 0xe703_7ed1_a0b4_28db);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn mix_ip(seed: u64, ip: u128) -> u64 {
    mix(seed ^ (ip >> 64) as u64, ip as u64)
}

fn protocol_bits(protocol: Protocol) -> u64 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

/// Hash of the 5-tuple (client ip/port, frontend ip/port, protocol): the cloud
/// L4 default distribution.
#[inline]
pub fn hash_five_tuple(flow: &Flow) -> u64 {
    let h = mix_ip(0, flow.client_ip);
    let h = mix_ip(h, flow.frontend_ip);
    let ports =
        (u64::from(flow.client_port) << 32) | (u64::from(flow.frontend_port) << 8) | protocol_bits(flow.protocol);
    mix(h, ports)
}

/// Hash of the client's address only (client-IP affinity), optionally with the
/// protocol (2- or 3-tuple affinity).
#[inline]
pub fn hash_source_ip(flow: &Flow, with_protocol: bool) -> u64 {
    let salt = if with_protocol { protocol_bits(flow.protocol) } else { 0 };
    mix_ip(salt, flow.client_ip)
}

/// A backend's identity for consistent hashing: its address, not its id, so
/// that a backend keeps its slots when others come and go.
pub fn backend_key(backend: &Backend) -> u64 {
    mix_ip(u64::from(backend.port), backend.ip)
}

/// The smallest prime at least `n` (for a Maglev table's size).
pub fn next_prime(n: usize) -> usize {
    let is_prime = |m: usize| m >= 2 && (2..).take_while(|d| d * d <= m).all(|d| !m.is_multiple_of(d));
    (n.max(2)..).find(|&m| is_prime(m)).unwrap_or(n)
}

/// The table size (a prime) for up to 655 backends (100 slots each at
/// least), and the one past that. Not chosen by the backend count within
/// that range: a table whose size changed when a backend left would remap
/// nearly every flow (the minimal-disruption property test found it).
const MAGLEV_SIZE: usize = 65521;
const MAGLEV_SIZE_LARGE: usize = 1_000_003;

/// A weighted Maglev lookup table (Eisenbud et al., NSDI 2016): even spread,
/// minimal disruption when the backend set changes, O(1) lookup.
#[derive(Clone, Debug, Default)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table over the eligible backends, slots proportional to
    /// weight: [`MAGLEV_SIZE`] slots, or [`MAGLEV_SIZE_LARGE`] past 655
    /// eligible backends.
    pub fn new(backends: &[Backend]) -> Maglev {
        let eligible = backends.iter().filter(|b| b.is_eligible()).count();
        let size = if eligible * 100 <= MAGLEV_SIZE { MAGLEV_SIZE } else { MAGLEV_SIZE_LARGE };
        Maglev::with_size(backends, size)
    }

    /// Builds a table of `size` slots (a prime: [`next_prime`]; at least 2).
    /// The table depends on the set of backends (addresses and weights), not
    /// on their order: every instance with the same set, in any process,
    /// maps a hash to the same backend.
    pub fn with_size(backends: &[Backend], size: usize) -> Maglev {
        let mut members: Vec<&Backend> = backends.iter().filter(|b| b.is_eligible()).collect();
        if members.is_empty() || size < 2 {
            return Maglev::default();
        }
        members.sort_by_key(|b| (backend_key(b), b.ip, b.port));
        let max_weight = members.iter().map(|b| u64::from(b.weight)).max().unwrap_or(1);
        let perms: Vec<(usize, usize)> = members
            .iter()
            .map(|b| {
                let key = backend_key(b);
                let offset = (mix(key, 1) % size as u64) as usize;
                let skip = (mix(key, 2) % (size as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; members.len()];
        let mut credit = vec![0u64; members.len()];
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        while filled < size {
            for (i, member) in members.iter().enumerate() {
                credit[i] += u64::from(member.weight);
                while credit[i] >= max_weight && filled < size {
                    credit[i] -= max_weight;
                    let (offset, skip) = perms[i];
                    loop {
                        let slot = (offset + next[i] * skip) % size;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = member.id;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        Maglev { table }
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The backend id for `hash`, `None` when no backend is eligible.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize])
    }

    /// Like [`lookup`](Self::lookup), but never the flow's own host (B15):
    /// re-hashes a few times, then walks the table.
    pub fn lookup_avoiding(&self, hash: u64, flow: &Flow, backends: &[Backend]) -> Option<u32> {
        let is_client = |id: u32| backends.get(id as usize).is_some_and(|b| b.is_client_of(flow));
        let mut h = hash;
        for _ in 0..8 {
            let id = self.lookup(h)?;
            if !is_client(id) {
                return Some(id);
            }
            h = mix(h, 0x5bd1_e995);
        }
        let start = (hash % self.table.len() as u64) as usize;
        (0..self.table.len()).map(|i| self.table[(start + i) % self.table.len()]).find(|&id| !is_client(id))
    }
}

/// A consistent-hash selector: a [`Maglev`] table plus the backend set, for
/// the hash-based stock balancers (five-tuple, source-ip).
#[derive(Clone, Debug, Default)]
pub struct HashRing {
    maglev: Maglev,
    backends: Vec<Backend>,
    allow_hairpin: bool,
}

impl HashRing {
    /// `allow_hairpin` lets a flow land on its own host (B15 off).
    pub fn set_allow_hairpin(&mut self, allow: bool) {
        self.allow_hairpin = allow;
    }

    pub fn rebuild(&mut self, backends: &[Backend]) {
        self.maglev = Maglev::new(backends);
        self.backends = backends.to_vec();
    }

    /// As [`HashRing::rebuild`], with a table of `size` slots (a prime).
    pub fn rebuild_sized(&mut self, backends: &[Backend], size: usize) {
        self.maglev = Maglev::with_size(backends, size);
        self.backends = backends.to_vec();
    }

    /// The backend for a flow hashing to `hash`.
    #[inline]
    pub fn pick(&self, hash: u64, flow: &Flow) -> crate::Selection {
        let id = if self.allow_hairpin {
            self.maglev.lookup(hash)
        } else {
            self.maglev.lookup_avoiding(hash, flow, &self.backends)
        };
        id.map_or(crate::Selection::Reject, crate::Selection::Backend)
    }
}

/// Longest smooth weighted round-robin cycle; longer cycles are scaled down.
const MAX_SCHEDULE: u64 = 16_384;

/// The cycle of nginx's smooth weighted round robin over the eligible
/// backends: each backend appears `weight / gcd` times, evenly interleaved
/// (3:1 gives A A B A).
pub fn weighted_schedule(backends: &[Backend]) -> Vec<u32> {
    let members: Vec<&Backend> = backends.iter().filter(|b| b.is_eligible()).collect();
    let gcd = members.iter().fold(0u64, |g, b| gcd(g, u64::from(b.weight))).max(1);
    let mut units: Vec<u64> = members.iter().map(|b| u64::from(b.weight) / gcd).collect();
    let total: u64 = units.iter().sum();
    if total > MAX_SCHEDULE {
        for u in &mut units {
            *u = (*u * MAX_SCHEDULE / total).max(1);
        }
    }
    let total: u64 = units.iter().sum();
    let mut current = vec![0i64; members.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..members.len() {
            current[i] += units[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        schedule.push(members[best].id);
    }
    schedule
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The host's built-in fallback (and a plugin's last resort): five-tuple hash
/// over the eligible backends that are not the client itself. O(n), for the
/// rare flow whose plugin faulted.
pub fn fallback_pick(backends: &[Backend], flow: &Flow) -> Option<u32> {
    fallback_pick_with(backends, flow, false)
}

/// [`fallback_pick`], with the client's own host among the candidates when
/// `allow_hairpin` (the pool's switch, B15).
pub fn fallback_pick_with(backends: &[Backend], flow: &Flow, allow_hairpin: bool) -> Option<u32> {
    let ok = |b: &&Backend| b.is_eligible() && (allow_hairpin || !b.is_client_of(flow));
    let count = backends.iter().filter(ok).count();
    if count == 0 {
        return None;
    }
    let n = (hash_five_tuple(flow) % count as u64) as usize;
    backends.iter().filter(ok).nth(n).map(|b| b.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backends, flow};

    #[test]
    fn maglev_spreads_by_weight_and_skips_ineligible() {
        let set = backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 50), ("10.0.0.3:80", 0)]);
        let m = Maglev::new(&set);
        let mut counts = [0u32; 3];
        for i in 0..30_000u64 {
            counts[m.lookup(mix(i, 99)).unwrap() as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((1.8..2.2).contains(&ratio), "{counts:?}");
    }

    #[test]
    fn maglev_moves_few_flows_when_a_backend_leaves() {
        let five: Vec<String> = (1..=5).map(|i| format!("10.0.0.{i}:80")).collect();
        let list: Vec<(&str, u32)> = five.iter().map(|s| (s.as_str(), 100)).collect();
        let before = Maglev::new(&backends(&list));
        let mut fewer = backends(&list);
        fewer[4].weight = 0;
        let after = Maglev::new(&fewer);
        let moved = (0..10_000u64)
            .map(|i| mix(i, 7))
            .filter(|&h| before.lookup(h) != Some(4) && before.lookup(h) != after.lookup(h))
            .count();
        assert!(moved < 1_000, "{moved} of the flows not on the removed backend moved");
    }

    #[test]
    fn maglev_avoids_the_client_itself() {
        let set = backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)]);
        let m = Maglev::new(&set);
        for port in 1000..1200 {
            let f = flow(&format!("10.0.0.1:{port}"), "10.9.9.9:80");
            assert_eq!(m.lookup_avoiding(hash_five_tuple(&f), &f, &set), Some(1));
        }
        let alone = backends(&[("10.0.0.1:80", 100)]);
        let f = flow("10.0.0.1:1000", "10.9.9.9:80");
        assert_eq!(Maglev::new(&alone).lookup_avoiding(1, &f, &alone), None);
    }

    #[test]
    fn schedule_is_smooth_and_weighted() {
        let set = backends(&[("10.0.0.1:80", 3), ("10.0.0.2:80", 1), ("10.0.0.3:80", 0)]);
        assert_eq!(weighted_schedule(&set), vec![0, 0, 1, 0]);
        let equal = backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100), ("10.0.0.3:80", 100)]);
        assert_eq!(weighted_schedule(&equal), vec![0, 1, 2]);
        assert!(weighted_schedule(&[]).is_empty());
    }

    #[test]
    fn fallback_uses_only_eligible_backends() {
        let mut set = backends(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)]);
        set[0].state = crate::BackendState::Down;
        for port in 1000..1100 {
            assert_eq!(fallback_pick(&set, &flow(&format!("10.1.1.1:{port}"), "10.9.9.9:80")), Some(1));
        }
        set[1].state = crate::BackendState::Draining;
        assert_eq!(fallback_pick(&set, &flow("10.1.1.1:1", "10.9.9.9:80")), None);
    }

    #[test]
    fn hashes_depend_on_what_they_should() {
        let a = flow("10.1.1.1:1000", "10.9.9.9:80");
        let b = flow("10.1.1.1:1001", "10.9.9.9:80");
        assert_ne!(hash_five_tuple(&a), hash_five_tuple(&b));
        assert_eq!(hash_source_ip(&a, false), hash_source_ip(&b, false));
        let mut udp = a;
        udp.protocol = Protocol::Udp;
        assert_eq!(hash_source_ip(&a, false), hash_source_ip(&udp, false));
        assert_ne!(hash_source_ip(&a, true), hash_source_ip(&udp, true));
    }
}

/// Properties over random backend sets (proptest): Maglev's order
/// independence, weighted spread and minimal disruption; the smooth weighted
/// round robin's exact shares and spacing.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::backends;

    /// 2..12 distinct backends 10.0.<i>.<j>:80 with weights 1..=100.
    fn backend_sets() -> impl Strategy<Value = Vec<(String, u32)>> {
        proptest::collection::btree_map(0u16..2000, 1u32..=100, 2..12)
            .prop_map(|m| m.into_iter().map(|(i, w)| (format!("10.0.{}.{}:80", i / 250, i % 250 + 1), w)).collect())
    }

    fn set(list: &[(String, u32)]) -> Vec<Backend> {
        let pairs: Vec<(&str, u32)> = list.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        backends(&pairs)
    }

    /// The backend each of `samples` hashes goes to, by address.
    fn routes(m: &Maglev, set: &[Backend], samples: u64) -> Vec<(u128, u16)> {
        (0..samples)
            .map(|i| {
                let id = m.lookup(mix(i, 7)).unwrap();
                let b = set.iter().find(|b| b.id == id).unwrap();
                (b.ip, b.port)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn maglev_depends_on_the_set_not_its_order(list in backend_sets(), seed in any::<u64>()) {
            let a = set(&list);
            let mut shuffled = list.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = mix(s, i as u64);
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let b = set(&shuffled);
            prop_assert_eq!(routes(&Maglev::new(&a), &a, 4000), routes(&Maglev::new(&b), &b, 4000));
        }

        #[test]
        fn maglev_spreads_by_weight(list in backend_sets()) {
            let set = set(&list);
            let m = Maglev::with_size(&set, 65521);
            let mut slots = vec![0u64; set.len()];
            for slot in 0..65521u64 {
                slots[m.lookup(slot).unwrap() as usize] += 1;
            }
            let total_weight: u64 = set.iter().map(|b| u64::from(b.weight)).sum();
            for (b, &got) in set.iter().zip(&slots) {
                let want = 65521.0 * f64::from(b.weight) / total_weight as f64;
                // Within 2 % of the table, or 25 % of its own share.
                let slack = (want * 0.25).max(65521.0 * 0.02);
                prop_assert!((got as f64 - want).abs() <= slack, "{} slots for weight {} (want {want:.0})", got, b.weight);
            }
        }

        #[test]
        fn removing_one_of_equal_backends_moves_few_flows_of_the_others(
            list in backend_sets(),
            pick in any::<prop::sample::Index>(),
        ) {
            // Minimal disruption is Maglev's promise for equal weights.
            let list: Vec<(String, u32)> = list.into_iter().map(|(a, _)| (a, 100)).collect();
            let before = set(&list);
            let gone = pick.index(list.len());
            let mut rest = list.clone();
            rest.remove(gone);
            let after = set(&rest);
            let (old, new) = (Maglev::new(&before), Maglev::new(&after));
            let (was, now) = (routes(&old, &before, 20_000), routes(&new, &after, 20_000));
            let removed = (before[gone].ip, before[gone].port);
            let staying = was.iter().filter(|r| **r != removed).count();
            let moved = was.iter().zip(&now).filter(|(w, n)| w != n && **w != removed).count();
            prop_assert!(moved * 100 <= staying * 10, "{moved} of {staying} flows of staying backends moved");
        }

        #[test]
        fn the_smooth_schedule_gives_each_its_exact_share(weights in proptest::collection::vec(1u32..=20, 1..8)) {
            let list: Vec<(String, u32)> = weights.iter().enumerate().map(|(i, w)| (format!("10.1.0.{}:80", i + 1), *w)).collect();
            let set = set(&list);
            let schedule = weighted_schedule(&set);
            let g = weights.iter().fold(0u32, |g, &w| gcd(u64::from(g), u64::from(w)) as u32);
            prop_assert_eq!(schedule.len() as u32, weights.iter().map(|w| w / g).sum::<u32>());
            for (id, w) in weights.iter().enumerate() {
                let count = schedule.iter().filter(|&&s| s == id as u32).count() as u32;
                prop_assert_eq!(count, w / g);
            }
            // Smooth: at every point each backend is within a few turns of
            // its exact share (a naive A A A B B schedule is not).
            let total = schedule.len() as f64;
            let mut counts = vec![0f64; weights.len()];
            for (t, &id) in schedule.iter().enumerate() {
                counts[id as usize] += 1.0;
                for (i, w) in weights.iter().enumerate() {
                    let ideal = (t + 1) as f64 * f64::from(w / g) / total;
                    prop_assert!((counts[i] - ideal).abs() < weights.len() as f64, "backend {i} at turn {t}: {} vs {ideal:.1} in {:?}", counts[i], schedule);
                }
            }
        }
    }
}

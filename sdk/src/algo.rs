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

/// Table sizes (primes); the smallest that is at least 100 slots a backend.
const MAGLEV_SIZES: [usize; 5] = [251, 1021, 4093, 16381, 65521];

/// A weighted Maglev lookup table (Eisenbud et al., NSDI 2016): even spread,
/// minimal disruption when the backend set changes, O(1) lookup.
#[derive(Clone, Debug, Default)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table over the eligible backends, slots proportional to
    /// weight, its size the smallest of a few primes that gives each backend
    /// at least 100 slots.
    pub fn new(backends: &[Backend]) -> Maglev {
        let eligible = backends.iter().filter(|b| b.is_eligible()).count();
        let size =
            MAGLEV_SIZES.iter().copied().find(|&m| m >= eligible * 100).unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1]);
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

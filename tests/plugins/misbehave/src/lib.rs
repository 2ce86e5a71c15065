//! A balancer that misbehaves on purpose, for the plugin-fault tests.
//!
//! Config `{ mode = "...", every = N }`: the flows it misbehaves on are every
//! N-th one (default 1 = all); the others get round robin.
//! - `trap`: panics (a Wasm trap);
//! - `spin`: loops forever (the host's deadline must stop it);
//! - `grow`: allocates without bound (the host's memory cap must stop it);
//! - `bogus`: answers a backend id that does not exist;
//! - `pin` (also with no config): always answers backend `backend` (default
//!   0): a well-behaved policy;
//! - `print`: writes a line to stdout and stderr, then round robin (WASI);
//! - `sleep`: `std::thread::sleep` for `millis` (default 30 s) in the call
//!   named by `at` (`select`, the default; `init`; `backends-changed`): a
//!   WASI clock subscription and a `poll` that would wait;
//! - `hairpin`: answers the backend whose address is the client's own (B15);
//! - `init-error`: refuses its config with an error of `bytes` bytes;
//! - `slow`: `backends-changed` computes (spins) for `millis` each time;
//! - `socket`: tries the network on every misbehaving call (a UDP bind, a
//!   TCP connect and listen to 127.0.0.1); each must fail with an error, and
//!   it then answers round robin (it traps if one succeeded);
//! - `flood`: prints `bytes` bytes in lines of 1 MiB to stdout, and logs a
//!   1 MiB line through the `log` import, on every misbehaving call.

use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    mode: String,
    every: u64,
    backend: u32,
    at: String,
    millis: u64,
    bytes: usize,
}

impl Settings {
    /// Sleeps if the mode is `sleep` and `call` is where it sleeps.
    fn sleep_in(&self, call: &str) {
        if self.mode == "sleep" && (self.at == call || self.at.is_empty() && call == "select") {
            let millis = if self.millis == 0 { 30_000 } else { self.millis };
            std::thread::sleep(std::time::Duration::from_millis(millis));
        }
    }
}

#[derive(Default)]
pub struct Misbehave {
    settings: Settings,
    backends: u32,
    calls: u64,
    hoard: Vec<Vec<u8>>,
    /// Each backend's IP, by id.
    addresses: Vec<u128>,
    /// The ids that may take new flows (round robin goes over these).
    eligible: Vec<u32>,
}

impl Balancer for Misbehave {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.settings = config.parse()?;
        self.settings.sleep_in("init");
        match self.settings.mode.as_str() {
            "" => {
                self.settings.mode = "pin".into();
                Ok(())
            }
            "init-error" => Err("e".repeat(self.settings.bytes)),
            "trap" | "spin" | "grow" | "bogus" | "pin" | "print" | "sleep" | "hairpin" | "flood" | "slow"
            | "socket" => Ok(()),
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.settings.sleep_in("backends-changed");
        if self.settings.mode == "slow" {
            // A mark a test can wait for: the slow part starts now.
            fulcrum_sdk::host::log(fulcrum_sdk::host::Level::Info, "misbehave: slow backends-changed");
            let start = fulcrum_sdk::host::now();
            while fulcrum_sdk::host::now().saturating_sub(start) < self.settings.millis * 1_000_000 {
                std::hint::spin_loop();
            }
        }
        self.backends = backends.len() as u32;
        self.addresses = backends.iter().map(|b| b.ip).collect();
        self.eligible = backends.iter().filter(|b| b.is_eligible()).map(|b| b.id).collect();
    }

    fn select(&mut self, flow: &Flow) -> Selection {
        self.calls += 1;
        if self.calls.is_multiple_of(self.settings.every.max(1)) {
            self.settings.sleep_in("select");
            if self.settings.mode == "hairpin"
                && let Some(id) = self.addresses.iter().position(|ip| *ip == flow.client_ip)
            {
                return Selection::Backend(id as u32);
            }
        }
        let misbehave = self.calls.is_multiple_of(self.settings.every.max(1));
        if misbehave {
            match self.settings.mode.as_str() {
                "trap" => panic!("misbehave: trapping on purpose"),
                "spin" => {
                    let mut x = self.calls;
                    while std::hint::black_box(x) != 0 {
                        x = x.wrapping_add(2) | 1;
                    }
                }
                "grow" => loop {
                    self.hoard.push(vec![1u8; 1 << 20]);
                },
                "bogus" => return Selection::Backend(self.backends + 7),
                "pin" => return Selection::Backend(self.settings.backend),
                "flood" => {
                    let line = "x".repeat(1 << 20);
                    for _ in 0..self.settings.bytes >> 20 {
                        println!("{line}");
                    }
                    fulcrum_sdk::host::log(fulcrum_sdk::host::Level::Info, &line);
                }
                "socket" => {
                    let udp = std::net::UdpSocket::bind("127.0.0.1:0");
                    let tcp = std::net::TcpStream::connect("127.0.0.1:9");
                    let listen = std::net::TcpListener::bind("127.0.0.1:0");
                    assert!(udp.is_err() && tcp.is_err() && listen.is_err(), "misbehave: a socket call succeeded");
                }
                "print" => {
                    println!("misbehave: stdout line {}", self.calls);
                    eprintln!("misbehave: stderr line {}", self.calls);
                }
                _ => {}
            }
        }
        if self.eligible.is_empty() {
            return Selection::Reject;
        }
        Selection::Backend(self.eligible[(self.calls % self.eligible.len() as u64) as usize])
    }
}

fulcrum_sdk::export_balancer!(Misbehave);

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
//! - `print`: writes a line to stdout and stderr, then round robin (WASI).

use fulcrum_sdk::{Backend, Balancer, Config, Flow, Selection};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    mode: String,
    every: u64,
    backend: u32,
}

#[derive(Default)]
pub struct Misbehave {
    settings: Settings,
    backends: u32,
    calls: u64,
    hoard: Vec<Vec<u8>>,
}

impl Balancer for Misbehave {
    fn init(&mut self, config: &Config) -> Result<(), String> {
        self.settings = config.parse()?;
        match self.settings.mode.as_str() {
            "" => {
                self.settings.mode = "pin".into();
                Ok(())
            }
            "trap" | "spin" | "grow" | "bogus" | "pin" | "print" => Ok(()),
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn backends_changed(&mut self, backends: &[Backend]) {
        self.backends = backends.len() as u32;
    }

    fn select(&mut self, _flow: &Flow) -> Selection {
        self.calls += 1;
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
                "print" => {
                    println!("misbehave: stdout line {}", self.calls);
                    eprintln!("misbehave: stderr line {}", self.calls);
                }
                _ => {}
            }
        }
        if self.backends == 0 {
            return Selection::Reject;
        }
        Selection::Backend((self.calls % u64::from(self.backends)) as u32)
    }
}

fulcrum_sdk::export_balancer!(Misbehave);
